//! The `Pruner`: deletes finished tasks (steps, edges, history) and pgmq
//! archive rows older than the retention period, in bounded batches, on a
//! schedule. Running tasks are never touched. `weft prune` runs one pass.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::wake::jittered;

#[derive(Debug, Clone)]
pub struct PrunerConfig {
    /// Finished tasks older than this are deleted; `None` keeps everything.
    pub retention: Option<Duration>,
    /// How often a pass runs.
    pub interval: Duration,
    /// Rows deleted per transaction.
    pub batch_size: i32,
}

impl Default for PrunerConfig {
    fn default() -> Self {
        Self {
            retention: None,
            interval: Duration::from_secs(3600),
            batch_size: 500,
        }
    }
}

/// What a pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: i64,
    pub archived_messages: i64,
}

pub struct Pruner {
    pool: PgPool,
    config: PrunerConfig,
}

impl Pruner {
    pub fn new(pool: PgPool, config: PrunerConfig) -> Self {
        Self { pool, config }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let Some(retention) = self.config.retention else {
            return;
        };
        loop {
            tokio::select! {
                // Cancel-safe: cancellation is a flag.
                _ = shutdown.cancelled() => break,
                // Cancel-safe: a sleep holds no state.
                _ = tokio::time::sleep(jittered(self.config.interval)) => {}
            }
            match prune(&self.pool, retention, self.config.batch_size, &shutdown).await {
                Ok(p) if p != Pruned::default() => {
                    info!(
                        tasks = p.tasks,
                        archived_messages = p.archived_messages,
                        "pruned"
                    );
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "pruning failed; will try again"),
            }
        }
        info!("pruner stopped");
    }
}

/// Deletes what finished more than `older_than` ago, one bounded batch per
/// transaction, until a batch comes back short or `stop` is cancelled.
pub async fn prune(
    pool: &PgPool,
    older_than: Duration,
    batch_size: i32,
    stop: &CancellationToken,
) -> Result<Pruned, sqlx::Error> {
    let mut total = Pruned::default();
    loop {
        let (tasks, archived): (i64, i64) = sqlx::query_as(
            "select tasks, archived_messages
             from weft.prune(clock_timestamp() - make_interval(secs => $1), $2)",
        )
        .bind(older_than.as_secs_f64())
        .bind(batch_size)
        .fetch_one(pool)
        .await?;
        total.tasks += tasks;
        total.archived_messages += archived;
        if (tasks < i64::from(batch_size) && archived < i64::from(batch_size))
            || stop.is_cancelled()
        {
            return Ok(total);
        }
    }
}
