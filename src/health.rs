//! The worker's small HTTP server: liveness, readiness and metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use worker::WorkerState;

#[derive(Clone)]
struct Health {
    pool: PgPool,
    state: Arc<WorkerState>,
}

/// Binds `addr` and serves until `shutdown`. Binding happens before this
/// returns, so a taken port is a startup error.
pub async fn serve_worker(
    addr: SocketAddr,
    pool: PgPool,
    state: Arc<WorkerState>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let app = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Health { pool, state });
    tokio::spawn(async move {
        let stop = shutdown.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "worker health server failed");
        }
    });
    Ok(())
}

/// Ready: the database answers and the worker is not draining.
async fn ready(State(health): State<Health>) -> impl IntoResponse {
    if health.state.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    match sqlx::query("select 1").execute(&health.pool).await {
        Ok(_) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        health.state.render(),
    )
}
