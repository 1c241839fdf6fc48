//! The Weft orchestrator: turns tasks into steps, decides in SQL which steps
//! are ready, enqueues them on their namespace's queue (transactional
//! outbox), applies worker results with fencing, schedules retries and
//! finalizes tasks. Any number of orchestrators run at once, with no leader:
//! work on one task is serialized by its row lock, different tasks proceed
//! in parallel.
//!
//! Architecture invariant: the orchestrator never runs handlers, and every
//! state change it makes is a guarded statement inside the transaction that
//! also sends or deletes the queue messages it implies.

pub mod api;
pub mod collector;
pub mod lender;
pub mod metrics;
pub mod monitor;
pub mod operator;
pub mod pruner;
pub mod scheduler;
pub mod spans;
pub mod store;
pub mod tasks;
pub mod wake;

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use api::{Auth, Scope, Token};
pub use collector::{Collector, CollectorConfig};
pub use metrics::Metrics;
pub use scheduler::{Scheduler, SchedulerConfig};

/// How an orchestrator runs.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// Where the REST API listens; `None` runs without it (tests, embedding).
    pub http_addr: Option<SocketAddr>,
    /// Who may call the API. The default, on with no token, is refused at
    /// startup when the API listens: configure tokens or choose `Auth::Off`.
    pub auth: Auth,
    /// Result collector loops in this process.
    pub collectors: usize,
    pub collector: CollectorConfig,
    pub scheduler: SchedulerConfig,
    /// How often queue gauges are refreshed for `/metrics`.
    pub metrics_interval: std::time::Duration,
    pub pruner: pruner::PrunerConfig,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            http_addr: None,
            auth: Auth::default(),
            collectors: 2,
            collector: CollectorConfig::default(),
            scheduler: SchedulerConfig::default(),
            metrics_interval: std::time::Duration::from_secs(15),
            pruner: pruner::PrunerConfig::default(),
        }
    }
}

/// Why the orchestrator stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Auth(#[from] api::AuthError),
    #[error(
        "the database pool allows {max} connections (WEFT_DB_MAX_CONNECTIONS), but the \
         {collectors} result collectors and the retry scheduler keep {held} open (one to \
         work on each, and one to listen on) and the API needs at least 2 more: allow \
         {needed} or more, or run fewer collectors"
    )]
    TooFewConnections {
        max: u32,
        collectors: usize,
        held: u32,
        needed: u32,
    },
}

/// Connections the orchestrator's loops keep open: every collector and the
/// scheduler hold the connection they work on, and they share one LISTEN
/// connection (the [`wake::Hub`]).
fn connections_held(collectors: usize) -> u32 {
    u32::try_from(collectors.max(1))
        .unwrap_or(u32::MAX / 2)
        .saturating_add(2)
}

/// Runs the orchestrator's loops (and its API when configured) until
/// `shutdown` is cancelled, then waits for them to stop. Loops finish their
/// current transaction; anything uncommitted is left to its queue lease.
pub async fn run(
    config: OrchestratorConfig,
    pool: PgPool,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Check and bind first: a locked-out API, a pool too small for the loops
    // or a port in use is a startup error, before any loop runs.
    let held = connections_held(config.collectors);
    let max = pool.options().get_max_connections();
    if max < held + 2 {
        return Err(Error::TooFewConnections {
            max,
            collectors: config.collectors.max(1),
            held,
            needed: held + 2,
        });
    }
    let listener = match config.http_addr {
        Some(addr) => Some({
            config.auth.check()?;
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?
        }),
        None => None,
    };
    // The loops stop on shutdown, or when the API server fails.
    let stop = shutdown.child_token();
    let metrics = Metrics::default();
    let tracker = TaskTracker::new();
    // One LISTEN connection for the whole process (see wake.rs).
    let hub = wake::Hub::new(pool.clone(), &[shared::queue::RESULTS, scheduler::RETRIES]);
    tracker.spawn(hub.clone().run(stop.clone()));
    let crew = collector::Crew::default();
    for i in 0..config.collectors.max(1) {
        let role = if i == 0 {
            collector::Role::Lead(crew.clone())
        } else {
            collector::Role::Helper(crew.clone())
        };
        let collector = Collector::with_role(
            pool.clone(),
            config.collector.clone(),
            metrics.clone(),
            role,
        )
        .listening_through(&hub);
        let running = metrics.loop_running();
        let collector_stop = stop.clone();
        tracker.spawn(async move {
            let _running = running;
            collector.run(collector_stop).await
        });
    }
    let scheduler = Scheduler::new(pool.clone(), config.scheduler.clone(), metrics.clone())
        .listening_through(&hub);
    let running = metrics.loop_running();
    let scheduler_stop = stop.clone();
    tracker.spawn(async move {
        let _running = running;
        scheduler.run(scheduler_stop).await
    });
    // Readiness requires every collector and the scheduler to be running.
    metrics.expect_loops(config.collectors.max(1) as u64 + 1);
    metrics.watch_pool(pool.clone());
    let monitor =
        monitor::QueueMonitor::new(pool.clone(), config.metrics_interval, metrics.clone());
    tracker.spawn(monitor.run(stop.clone()));
    tracker.spawn(pruner::Pruner::new(pool.clone(), config.pruner.clone()).run(stop.clone()));

    let result = match listener {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                info!(http.addr = %addr, "orchestrator API listening");
            }
            let db = lender::Lender::new(pool.clone());
            tracker.spawn(db.clone().sweep(stop.clone()));
            let state = api::AppState {
                pool: pool.clone(),
                db,
                metrics: metrics.clone(),
                templates: Default::default(),
            };
            let app = api::router(state, &config.auth);
            let graceful = stop.clone();
            // Each answer goes out at once: with Nagle's algorithm a response
            // written in pieces may wait for the client's delayed ACK.
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    warn!(error = %e, "cannot set TCP_NODELAY on an API connection");
                }
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { graceful.cancelled().await })
                .await
                .map_err(Error::Serve)
        }
        None => {
            stop.cancelled().await;
            Ok(())
        }
    };
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    info!("orchestrator stopped");
    result
}
