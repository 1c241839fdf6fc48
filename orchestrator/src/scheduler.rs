//! The `Scheduler`: enqueues `waiting_retry` steps when their backoff
//! expires. It sleeps until the earliest due time, and is re-armed by the
//! `weft_retries` notification whenever a new retry is scheduled, so retries
//! run promptly without a coarse poll. Claims skip tasks other orchestrators
//! hold, so any number can run.

use std::time::Duration;

use shared::conn::HeldConnection;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::store;
use crate::wake::{Hub, Wake, jittered};

/// The channel a newly scheduled retry is notified on.
pub const RETRIES: &str = "weft_retries";

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tasks claimed per transaction.
    pub batch_size: i32,
    /// The longest sleep when no retry is due, in case a notification was lost.
    pub poll_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            poll_interval: Duration::from_secs(5),
        }
    }
}

pub struct Scheduler {
    pool: PgPool,
    /// The process's listener, when it shares one (see [`Hub`]).
    hub: Option<Hub>,
    conn: HeldConnection,
    config: SchedulerConfig,
    metrics: Metrics,
}

impl Scheduler {
    pub fn new(pool: PgPool, config: SchedulerConfig, metrics: Metrics) -> Self {
        Self {
            conn: HeldConnection::new(pool.clone()),
            pool,
            hub: None,
            config,
            metrics,
        }
    }

    /// Wakes through `hub`'s listener instead of one of its own.
    pub fn listening_through(mut self, hub: &Hub) -> Self {
        self.hub = Some(hub.clone());
        self
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut wake = Wake::through(self.hub.as_ref(), &self.pool, &[RETRIES]);
        loop {
            let mut sleep = jittered(self.config.poll_interval);
            match self.run_once().await {
                Ok(d) if d.claimed as i32 >= self.config.batch_size => continue,
                Ok(d) => {
                    if let Some(secs) = d.next_due_in_s {
                        sleep = sleep.min(Duration::from_secs_f64(secs.max(0.0)));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "enqueuing due retries failed; retrying");
                    self.metrics.db_error();
                }
            }
            if sleep.is_zero() {
                // Due now but claimed by another orchestrator: give it a moment.
                sleep = Duration::from_millis(5);
            }
            tokio::select! {
                // Cancel-safe: cancellation is a flag.
                _ = shutdown.cancelled() => break,
                // Cancel-safe: see Wake::wait.
                _ = wake.wait(sleep) => {}
            }
        }
        info!("scheduler stopped");
    }

    /// Claims tasks with a due retry, enqueues their ready steps and
    /// finalizes the claimed tasks left with nothing to run, in one statement
    /// on the connection this scheduler holds (a fresh one after a failure).
    pub async fn run_once(&mut self) -> Result<store::DispatchedRetries, store::StoreError> {
        let conn = self.conn.get().await?;
        let dispatched = match store::dispatch_due_retries(conn, self.config.batch_size).await {
            Ok(dispatched) => dispatched,
            Err(e) => {
                self.conn.discard();
                return Err(e);
            }
        };
        crate::spans::enqueued(&dispatched.enqueued);
        self.metrics
            .retries_enqueued(dispatched.enqueued.len() as u64);
        for f in dispatched.finalized.iter().filter(|f| f.finalized) {
            self.metrics.task_finished(f.state);
        }
        Ok(dispatched)
    }
}
