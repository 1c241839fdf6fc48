//! The `Heartbeat`: keeps the leases of the messages this worker holds, so a
//! long handler's step is not delivered to another worker meanwhile. One
//! statement extends them all; a message missing from its answer no longer
//! exists (the orchestrator withdrew it when the task was cancelled), so its
//! handler is told to stop and its result will be dropped.

use std::sync::Arc;
use std::time::Duration;

use shared::queue::{self, QueueName};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::WorkerConfig;
use crate::in_flight::InFlight;
use crate::state::WorkerState;

/// What one beat did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Beat {
    pub extended: usize,
    pub withdrawn: Vec<i64>,
}

pub struct Heartbeat {
    pool: PgPool,
    queue: QueueName,
    lease_secs: i32,
    interval: Duration,
    in_flight: InFlight,
    state: Arc<WorkerState>,
}

impl Heartbeat {
    pub fn new(
        pool: PgPool,
        config: &WorkerConfig,
        in_flight: InFlight,
        state: Arc<WorkerState>,
    ) -> Self {
        Self {
            pool,
            queue: QueueName::steps(&config.namespace),
            lease_secs: config.lease_secs(),
            interval: config.heartbeat_interval(),
            in_flight,
            state,
        }
    }

    /// Beats until `shutdown`. The worker stops it last, after the drain, so
    /// leases hold while in-flight handlers finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.interval);
        // A beat delayed by a slow database is not worth catching up on.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.reset();
        loop {
            tokio::select! {
                // Cancel-safe: cancellation is a flag.
                () = shutdown.cancelled() => break,
                // Cancel-safe: a missed tick is simply taken later.
                _ = ticks.tick() => {}
            }
            if let Err(e) = self.run_once().await {
                // Leases outlive a few missed beats (the interval is a third of
                // the lease), so keep beating; a redelivery is fenced anyway.
                self.state.db_error();
                warn!(error = %e, "extending leases failed");
            }
        }
        debug!("heartbeat stopped");
    }

    /// Extends every held message's lease; cancels the withdrawn ones.
    pub async fn run_once(&self) -> Result<Beat, sqlx::Error> {
        let held = self.in_flight.ids();
        if held.is_empty() {
            return Ok(Beat::default());
        }
        let kept = queue::extend_lease(&self.pool, &self.queue, &held, self.lease_secs).await?;
        self.state.db_ok();
        let withdrawn = self.in_flight.withdraw_missing(&held, &kept);
        if !withdrawn.is_empty() {
            info!(msg_ids = ?withdrawn, "steps withdrawn by the orchestrator; cancelling their handlers");
            self.state.withdrawn(withdrawn.len() as u64);
        }
        Ok(Beat {
            extended: kept.len(),
            withdrawn,
        })
    }
}
