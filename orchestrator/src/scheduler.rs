//! The `Scheduler`: enqueues `waiting_retry` steps when their backoff
//! expires. It sleeps until the earliest due time, and is re-armed by the
//! `weft_retries` notification whenever a new retry is scheduled, so retries
//! run promptly without a coarse poll. Claims skip tasks other orchestrators
//! hold, so any number can run.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::store;
use crate::wake::{Wake, jittered};

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
    config: SchedulerConfig,
    metrics: Metrics,
}

impl Scheduler {
    pub fn new(pool: PgPool, config: SchedulerConfig, metrics: Metrics) -> Self {
        Self {
            pool,
            config,
            metrics,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut wake = Wake::new(self.pool.clone(), &["weft_retries"]);
        loop {
            let mut sleep = jittered(self.config.poll_interval);
            match self.run_once().await {
                Ok(claimed) if claimed as i32 >= self.config.batch_size => continue,
                Ok(_) => match store::seconds_until_next_retry(&self.pool).await {
                    Ok(Some(secs)) => {
                        sleep = sleep.min(Duration::from_secs_f64(secs.max(0.0)));
                    }
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "reading the next retry time failed"),
                },
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

    /// Claims tasks with a due retry and enqueues their ready steps.
    /// Returns the number of tasks claimed.
    pub async fn run_once(&self) -> Result<usize, store::StoreError> {
        let mut tx = self.pool.begin().await?;
        let task_ids = store::claim_due_retry_tasks(&mut *tx, self.config.batch_size).await?;
        if task_ids.is_empty() {
            return Ok(0);
        }
        let enqueued = store::enqueue_ready_steps(&mut *tx, &task_ids).await?;
        crate::spans::enqueued(&enqueued);
        let finalized = store::finalize_tasks(&mut *tx, &task_ids).await?;
        tx.commit().await?;
        self.metrics.retries_enqueued(enqueued.len() as u64);
        for f in finalized.iter().filter(|f| f.finalized) {
            self.metrics.task_finished(f.state);
        }
        Ok(task_ids.len())
    }
}
