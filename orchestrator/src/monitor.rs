//! The `QueueMonitor`: refreshes the queue gauges (depth, in flight, oldest
//! age) with one query per interval, shared by every scrape, so scraping
//! `/metrics` never touches the queues itself.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::metrics::Metrics;

pub struct QueueMonitor {
    pool: PgPool,
    interval: Duration,
    metrics: Metrics,
}

impl QueueMonitor {
    pub fn new(pool: PgPool, interval: Duration, metrics: Metrics) -> Self {
        Self {
            pool,
            interval,
            metrics,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.run_once().await {
                debug!(error = %e, "queue stats unavailable");
            }
            tokio::select! {
                // Cancel-safe: cancellation is a flag.
                _ = shutdown.cancelled() => break,
                // Cancel-safe: a sleep holds no state.
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
        info!("queue monitor stopped");
    }

    /// Takes one snapshot of every Weft queue.
    pub async fn run_once(&self) -> Result<(), sqlx::Error> {
        let stats = shared::queue::stats(&self.pool).await?;
        self.metrics.set_queues(stats);
        Ok(())
    }
}
