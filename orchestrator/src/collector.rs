//! The `Collector`: consumes the result queue, applies results with fencing,
//! enqueues what became ready and finalizes tasks: one statement (one round
//! trip, one transaction) per batch, `weft.collect_results`.

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use shared::conn::HeldConnection;
use shared::message::ResultMessage;
use shared::queue::{self, QueueMessage, QueueName};

use crate::metrics::Metrics;
use crate::store;
use crate::wake::{Wake, jittered};

/// How the collector reads.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Results per transaction.
    pub batch_size: i32,
    /// How long a read result stays hidden from other collectors; if this
    /// orchestrator dies mid-batch, the results reappear after it.
    pub lease: Duration,
    /// Fallback poll when no notification arrives.
    pub poll_interval: Duration,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub read: usize,
    pub applied: usize,
    pub stale: usize,
    pub malformed: usize,
    pub enqueued: usize,
    /// Of `enqueued`, steps of retries that were due.
    pub retries: usize,
    pub finalized: usize,
}

pub struct Collector {
    pool: PgPool,
    conn: HeldConnection,
    config: CollectorConfig,
    metrics: Metrics,
}

impl Collector {
    pub fn new(pool: PgPool, config: CollectorConfig, metrics: Metrics) -> Self {
        Self {
            conn: HeldConnection::new(pool.clone()),
            pool,
            config,
            metrics,
        }
    }

    /// Runs until shutdown: drain the queue, then wait for a notification or
    /// the fallback poll.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut wake = Wake::new(self.pool.clone(), &[queue::RESULTS]);
        loop {
            match self.run_once().await {
                Ok(c) if c.read as i32 >= self.config.batch_size => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "collecting results failed; retrying");
                    self.metrics.db_error();
                }
            }
            tokio::select! {
                // Cancel-safe: cancellation is a flag.
                _ = shutdown.cancelled() => break,
                // Cancel-safe: a notification not yet taken stays buffered in the listener.
                _ = wake.wait(jittered(self.config.poll_interval)) => {}
            }
        }
        info!("collector stopped");
    }

    /// Reads and applies one batch of results, on the connection this
    /// collector holds (a fresh one after a failure).
    pub async fn run_once(&mut self) -> Result<Collected, store::StoreError> {
        let collected = self.collect().await;
        if collected.is_err() {
            self.conn.discard();
        }
        collected
    }

    async fn collect(&mut self) -> Result<Collected, store::StoreError> {
        let lease = i32::try_from(self.config.lease.as_secs().max(1)).unwrap_or(30);
        let results = QueueName::results();
        let conn = self.conn.get().await?;
        let messages = queue::read(&mut *conn, &results, lease, self.config.batch_size).await?;
        if messages.is_empty() {
            return Ok(Collected::default());
        }
        let mut done = Collected {
            read: messages.len(),
            ..Collected::default()
        };
        let (good, bad): (Vec<_>, Vec<_>) = messages
            .iter()
            .map(|m| (m, ResultMessage::decode(&m.message)))
            .partition(|(_, r)| r.is_ok());

        if !bad.is_empty() {
            // Rare: dead-letter the undecodable ones on their own, so the
            // good ones still go through in one statement.
            let dead: Vec<Value> = bad
                .iter()
                .map(|(m, e)| {
                    dead_letter(
                        m,
                        &e.as_ref()
                            .err()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                    )
                })
                .collect();
            for (m, e) in &bad {
                warn!(msg_id = m.msg_id, error = ?e.as_ref().err(), "malformed result message dead-lettered");
            }
            let ids: Vec<i64> = bad.iter().map(|(m, _)| m.msg_id).collect();
            let mut tx = conn.begin().await?;
            queue::send_batch(&mut *tx, &QueueName::results_dead_letters(), &dead).await?;
            queue::delete_batch(&mut *tx, &results, &ids).await?;
            tx.commit().await?;
            done.malformed = bad.len();
        }
        let (ids, decoded): (Vec<i64>, Vec<ResultMessage>) = good
            .into_iter()
            .filter_map(|(m, r)| r.ok().map(|r| (m.msg_id, r)))
            .unzip();
        if !decoded.is_empty() {
            let payload = Value::Array(decoded.iter().map(ResultMessage::to_value).collect());
            let batch = store::collect_results(&mut *conn, &payload, &ids).await?;
            for (result, a) in decoded.iter().zip(&batch.applied) {
                crate::spans::applied(result, &a.outcome);
            }
            done.stale = batch.applied.iter().filter(|a| a.is_stale()).count();
            done.applied = batch.applied.len() - done.stale;
            for a in batch.applied.iter().filter(|a| a.is_stale()) {
                debug!(step.id = %a.step_id, attempt = a.attempt, "stale result dropped");
            }
            crate::spans::enqueued(&batch.enqueued);
            done.enqueued = batch.enqueued.len();
            done.retries = batch.retries;
            self.metrics.retries_enqueued(batch.retries as u64);
            for f in batch.finalized.iter().filter(|f| f.finalized) {
                info!(task.id = %f.task_id, state = %f.state, "task finished");
                self.metrics.task_finished(f.state);
            }
            done.finalized = batch.finalized.iter().filter(|f| f.finalized).count();
        }
        self.metrics.results(
            done.applied as u64,
            done.stale as u64,
            done.malformed as u64,
        );
        Ok(done)
    }
}

fn dead_letter(message: &QueueMessage, reason: &str) -> Value {
    serde_json::json!({
        "v": 1,
        "reason": "malformed_message",
        "detail": reason,
        "queue": queue::RESULTS,
        "msg_id": message.msg_id,
        "read_ct": message.read_ct,
        "message": message.message,
        "dead_lettered_at": chrono::Utc::now(),
    })
}
