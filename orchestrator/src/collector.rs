//! The `Collector`: consumes the result queue, applies results with fencing,
//! enqueues what became ready and finalizes tasks: one statement (one round
//! trip, one transaction) per batch, read included: `weft.collect_batch`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use shared::conn::HeldConnection;
use shared::linger::Linger;
use shared::message::ResultMessage;
use shared::queue::{self, QueueMessage, QueueName};

use crate::metrics::Metrics;
use crate::store;
use crate::wake::{Hub, Wake, Woken, jittered};

/// How the collector reads.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Results per transaction.
    pub batch_size: i32,
    /// How long a result the batch statement handed back to the decoder, or
    /// one read for the one-at-a-time pass after a failure, stays hidden from
    /// other collectors. The usual batch holds row locks instead: if this
    /// orchestrator dies mid-batch, its results are visible again at once.
    pub lease: Duration,
    /// Fallback poll when no notification arrives.
    pub poll_interval: Duration,
    /// How long the lead collector's batch may wait for more results while
    /// results of independent tasks stream in (see [`shared::linger`]).
    /// Zero: never wait.
    pub linger: Duration,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            linger: shared::linger::DEFAULT,
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

/// How an orchestrator's collectors share wake-ups. Each listens on its own
/// connection, so a result that arrives while one collector is mid-batch is
/// taken at once by another, with no hand-off between tasks. But every
/// listener gets every notification: when the lead collector is waiting it
/// wakes for it too, and a helper woken beside it would only find the rows
/// locked or gone and run an empty batch. So a helper acts on a
/// notification only while the lead is mid-batch or not listening, and not
/// when every result it names is one the lead woke for before its batch
/// began (that batch sees them) or one a batch of the crew already took.
/// The lead, likewise, skips a wake-up for results the crew already took
/// (a notification that arrived while the batch that took them ran). A
/// notification that names nothing (an empty payload) always counts. On
/// its fallback poll a collector always runs.
#[derive(Clone, Default)]
pub struct Crew {
    lead: Arc<LeadState>,
    taken: Arc<Mutex<Taken>>,
}

#[derive(Default)]
struct LeadState {
    busy: AtomicBool,
    listening: AtomicBool,
    /// The results the lead's current (or next) batch woke for: committed
    /// before it began, so visible to it.
    claimed: Mutex<HashSet<i64>>,
}

/// The message ids of results the crew's batches took (applied, or leased
/// to their decoder), the latest [`Taken::KEPT`]: a notification is
/// delivered within moments of its commit, so an older id is not asked about.
#[derive(Default)]
struct Taken {
    order: VecDeque<i64>,
    ids: HashSet<i64>,
}

impl Taken {
    const KEPT: usize = 16_384;

    fn insert(&mut self, ids: impl IntoIterator<Item = i64>) {
        for id in ids {
            if self.ids.insert(id) {
                self.order.push_back(id);
            }
        }
        while self.order.len() > Self::KEPT {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

impl Crew {
    /// Whether the lead will take a notification that arrives now: it is
    /// waiting on a connected listener (a notification that arrives while it
    /// ends a batch stays buffered and wakes it as soon as it waits).
    fn lead_covers(&self) -> bool {
        !self.lead.busy.load(Ordering::Acquire) && self.lead.listening.load(Ordering::Acquire)
    }

    /// Whether every one of `named` was taken by a batch of the crew.
    fn all_taken(&self, named: &[i64]) -> bool {
        let taken = lock(&self.taken);
        named.iter().all(|id| taken.ids.contains(id))
    }

    /// Whether every one of `named` was taken, or is seen by the lead's batch.
    fn all_covered(&self, named: &[i64]) -> bool {
        let taken = lock(&self.taken);
        let claimed = lock(&self.lead.claimed);
        named
            .iter()
            .all(|id| taken.ids.contains(id) || claimed.contains(id))
    }

    fn took(&self, ids: impl IntoIterator<Item = i64>) {
        lock(&self.taken).insert(ids);
    }

    /// The lead is about to run a batch for these results (before it marks
    /// itself busy, so a helper never finds it busy and them unclaimed).
    fn claim(&self, named: &[i64]) {
        lock(&self.lead.claimed).extend(named);
    }

    fn unclaim(&self) {
        lock(&self.lead.claimed).clear();
    }
}

/// The crew's sets are only ever left consistent (no panics while held).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A collector's place in its crew.
#[derive(Clone)]
pub enum Role {
    /// Acts on every wake-up.
    Lead(Crew),
    /// Acts on notifications the lead cannot take now, and on its own poll.
    Helper(Crew),
}

impl Role {
    fn crew(&self) -> &Crew {
        match self {
            Role::Lead(crew) | Role::Helper(crew) => crew,
        }
    }
}

pub struct Collector {
    pool: PgPool,
    /// The process's listener, when it shares one (see [`Hub`]).
    hub: Option<Hub>,
    conn: HeldConnection,
    config: CollectorConfig,
    metrics: Metrics,
    role: Role,
    linger: Linger,
    /// Whether the next pass applies results one at a time (after a failure).
    isolate: bool,
}

impl Collector {
    /// A collector on its own: the lead of a crew of one.
    pub fn new(pool: PgPool, config: CollectorConfig, metrics: Metrics) -> Self {
        Self::with_role(pool, config, metrics, Role::Lead(Crew::default()))
    }

    pub fn with_role(pool: PgPool, config: CollectorConfig, metrics: Metrics, role: Role) -> Self {
        Self {
            conn: HeldConnection::new(pool.clone()),
            pool,
            hub: None,
            linger: Linger::new(config.linger),
            config,
            metrics,
            role,
            isolate: false,
        }
    }

    /// Wakes through `hub`'s listener instead of one of its own.
    pub fn listening_through(mut self, hub: &Hub) -> Self {
        self.hub = Some(hub.clone());
        self
    }

    /// Runs until shutdown: drain the queue, then wait for a notification or
    /// the fallback poll.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut wake = Wake::through(self.hub.as_ref(), &self.pool, &[queue::RESULTS]);
        // Whether the batch about to run waited, and whether that gathered anything.
        let mut lingered: Option<bool> = None;
        'collect: loop {
            self.set_busy(true);
            let collected = self.run_once().await;
            self.set_busy(false);
            self.linger.end(Instant::now(), lingered.take());
            if let Role::Lead(crew) = &self.role {
                crew.unclaim();
            }
            match collected {
                Ok(c) if c.read as i32 >= self.config.batch_size => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "collecting results failed; retrying");
                    self.metrics.db_error();
                }
            }
            loop {
                let woken = tokio::select! {
                    // Cancel-safe: cancellation is a flag.
                    _ = shutdown.cancelled() => break 'collect,
                    // Cancel-safe: a notification not yet taken stays buffered in the listener.
                    woken = wake.wait(jittered(self.config.poll_interval)) => woken,
                };
                let named = wake.named().filter(|_| woken == Woken::Notified);
                match &self.role {
                    Role::Lead(crew) => {
                        crew.lead
                            .listening
                            .store(wake.listening(), Ordering::Release);
                        if let Some(named) = named {
                            if crew.all_taken(named) {
                                self.metrics.wakeup_skipped();
                                continue;
                            }
                            crew.claim(named);
                        }
                        if woken == Woken::Notified
                            && let Some(deadline) = self.linger.begin(Instant::now())
                        {
                            let in_hand = named.map_or(1, <[i64]>::len);
                            let gathered = tokio::select! {
                                // Cancel-safe: cancellation is a flag.
                                _ = shutdown.cancelled() => break 'collect,
                                // Cancel-safe: what the wait took is claimed for the batch.
                                gathered = Self::gather(crew, &mut wake, deadline, in_hand) => gathered,
                            };
                            lingered = Some(gathered);
                        }
                    }
                    Role::Helper(crew) if woken == Woken::Notified && crew.lead_covers() => {
                        continue;
                    }
                    Role::Helper(crew) if named.is_some_and(|named| crew.all_covered(named)) => {
                        self.metrics.wakeup_skipped();
                        continue;
                    }
                    Role::Helper(_) => {}
                }
                break;
            }
        }
        info!("collector stopped");
    }

    /// The lead's batch linger (see [`shared::linger`]): while results of
    /// independent tasks stream in, waits until `deadline` or a full batch
    /// for more to apply in the same transaction; whether any came. What
    /// the notifications name is claimed for the batch, as the first's was.
    async fn gather(crew: &Crew, wake: &mut Wake, deadline: Instant, mut in_hand: usize) -> bool {
        let mut gathered = false;
        while !Linger::full(in_hand) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || wake.wait(left).await != Woken::Notified {
                break;
            }
            match wake.named() {
                Some(named) if crew.all_taken(named) => continue,
                Some(named) => {
                    crew.claim(named);
                    in_hand += named.len();
                }
                None => in_hand += 1,
            }
            gathered = true;
        }
        gathered
    }

    fn set_busy(&self, busy: bool) {
        if let Role::Lead(crew) = &self.role {
            crew.lead.busy.store(busy, Ordering::Release);
        }
    }

    /// Reads and applies one batch of results, on the connection this
    /// collector holds (a fresh one after a failure).
    pub async fn run_once(&mut self) -> Result<Collected, store::StoreError> {
        let collected = if std::mem::take(&mut self.isolate) {
            self.collect_one_by_one().await
        } else {
            self.collect().await
        };
        if collected.is_err() {
            self.conn.discard();
            // A batch that failed may hold a result that fails every batch
            // it is in: the next pass applies them one at a time.
            self.isolate = true;
        }
        collected
    }

    fn lease_secs(&self) -> i32 {
        i32::try_from(self.config.lease.as_secs().max(1)).unwrap_or(30)
    }

    /// The usual pass: read, apply and delete in one statement
    /// (`weft.collect_batch`); messages it did not accept come back leased
    /// and are judged by the decoder.
    async fn collect(&mut self) -> Result<Collected, store::StoreError> {
        let lease = self.lease_secs();
        let conn = self.conn.get().await?;
        let read = store::collect_batch(&mut *conn, self.config.batch_size, lease).await?;
        let mut done = Collected {
            read: read.results.len() + read.unchecked.len(),
            ..Collected::default()
        };
        for (value, a) in read.results.iter().zip(&read.batch.applied) {
            match ResultMessage::decode(value) {
                Ok(result) => crate::spans::applied(&result, &a.outcome),
                Err(e) => debug!(error = %e, "applied result has no span"),
            }
        }
        record(&self.metrics, &read.batch, &mut done);
        self.role.crew().took(
            read.msg_ids
                .iter()
                .chain(read.unchecked.iter().map(|m| &m.msg_id))
                .copied(),
        );
        if !read.unchecked.is_empty() {
            Self::judge(&mut *conn, &self.metrics, &read.unchecked, &mut done).await?;
        }
        self.metrics.results(
            done.applied as u64,
            done.stale as u64,
            done.malformed as u64,
        );
        Ok(done)
    }

    /// After a failed pass: lease a batch and apply it one result per
    /// statement, so one result that cannot be applied (the database refuses
    /// it, whatever the batch) is dead-lettered instead of failing every
    /// batch it lands in. A transient failure (connection, deadlock,
    /// shutdown) stops the pass; the rest come back after their lease.
    async fn collect_one_by_one(&mut self) -> Result<Collected, store::StoreError> {
        let lease = self.lease_secs();
        let results = QueueName::results();
        let conn = self.conn.get().await?;
        let messages = queue::read(&mut *conn, &results, lease, self.config.batch_size).await?;
        let mut done = Collected {
            read: messages.len(),
            ..Collected::default()
        };
        for message in &messages {
            match Self::judge(
                &mut *conn,
                &self.metrics,
                std::slice::from_ref(message),
                &mut done,
            )
            .await
            {
                Ok(()) => {}
                Err(e) if is_transient(&e) => return Err(e),
                Err(e) => {
                    warn!(msg_id = message.msg_id, error = %e, "result the database refuses dead-lettered");
                    let dead = dead_letter(message, "apply_failed", &e.to_string());
                    move_to_dead_letters(&mut *conn, &[message.msg_id], &[dead]).await?;
                    done.malformed += 1;
                }
            }
        }
        info!(
            read = done.read,
            dead_lettered = done.malformed,
            "results applied one at a time after a failed batch"
        );
        self.metrics.results(
            done.applied as u64,
            done.stale as u64,
            done.malformed as u64,
        );
        Ok(done)
    }

    /// Decodes leased result messages: dead-letters those the protocol
    /// refuses, applies the rest in one statement (`weft.collect_results`).
    async fn judge(
        conn: &mut sqlx::PgConnection,
        metrics: &Metrics,
        messages: &[QueueMessage],
        done: &mut Collected,
    ) -> Result<(), store::StoreError> {
        let (good, bad): (Vec<_>, Vec<_>) = messages
            .iter()
            .map(|m| (m, ResultMessage::decode(&m.message)))
            .partition(|(_, r)| r.is_ok());
        if !bad.is_empty() {
            let dead: Vec<Value> = bad
                .iter()
                .map(|(m, e)| {
                    let detail = e
                        .as_ref()
                        .err()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    dead_letter(m, "malformed_message", &detail)
                })
                .collect();
            for (m, e) in &bad {
                warn!(msg_id = m.msg_id, error = ?e.as_ref().err(), "malformed result message dead-lettered");
            }
            let ids: Vec<i64> = bad.iter().map(|(m, _)| m.msg_id).collect();
            move_to_dead_letters(&mut *conn, &ids, &dead).await?;
            done.malformed += bad.len();
        }
        let (ids, decoded): (Vec<i64>, Vec<ResultMessage>) = good
            .into_iter()
            .filter_map(|(m, r)| r.ok().map(|r| (m.msg_id, r)))
            .unzip();
        if decoded.is_empty() {
            return Ok(());
        }
        let payload = Value::Array(decoded.iter().map(ResultMessage::to_value).collect());
        let batch = store::collect_results(&mut *conn, &payload, &ids).await?;
        for (result, a) in decoded.iter().zip(&batch.applied) {
            crate::spans::applied(result, &a.outcome);
        }
        record(metrics, &batch, done);
        Ok(())
    }
}

/// Moves result messages to the result dead-letter queue, in one transaction.
async fn move_to_dead_letters(
    conn: &mut sqlx::PgConnection,
    msg_ids: &[i64],
    dead: &[Value],
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    queue::send_batch(&mut *tx, &QueueName::results_dead_letters(), dead).await?;
    queue::delete_batch(&mut *tx, &QueueName::results(), msg_ids).await?;
    tx.commit().await
}

/// Adds what a batch statement did to `done` (and to the metrics and logs).
fn record(metrics: &Metrics, batch: &store::CollectedBatch, done: &mut Collected) {
    let stale = batch.applied.iter().filter(|a| a.is_stale()).count();
    done.stale += stale;
    done.applied += batch.applied.len() - stale;
    for a in batch.applied.iter().filter(|a| a.is_stale()) {
        debug!(step.id = %a.step_id, attempt = a.attempt, "stale result dropped");
    }
    crate::spans::enqueued(&batch.enqueued);
    done.enqueued += batch.enqueued.len();
    done.retries += batch.retries;
    metrics.retries_enqueued(batch.retries as u64);
    for f in batch.finalized.iter().filter(|f| f.finalized) {
        info!(task.id = %f.task_id, state = %f.state, "task finished");
        metrics.task_finished(f.state);
    }
    done.finalized += batch.finalized.iter().filter(|f| f.finalized).count();
}

/// Whether a failed statement may succeed if simply tried again: anything
/// but an error the database raised about the data (connection loss,
/// deadlock or serialization failure, shutdown, cancellation, no resources).
fn is_transient(error: &store::StoreError) -> bool {
    let store::StoreError::Database(sqlx::Error::Database(db)) = error else {
        return matches!(error, store::StoreError::Database(_));
    };
    let code = db.code().unwrap_or_default();
    ["08", "40", "53", "55", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
}

fn dead_letter(message: &QueueMessage, reason: &str, detail: &str) -> Value {
    serde_json::json!({
        "v": 1,
        "reason": reason,
        "detail": detail,
        "queue": queue::RESULTS,
        "msg_id": message.msg_id,
        "read_ct": message.read_ct,
        "message": message.message,
        "dead_lettered_at": chrono::Utc::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::{Crew, Taken};

    #[test]
    fn a_wake_up_is_skipped_only_for_results_taken_or_claimed_by_the_lead() {
        let crew = Crew::default();
        crew.took([1, 2]);
        assert!(crew.all_taken(&[1, 2]));
        assert!(!crew.all_taken(&[1, 3]), "3 was not taken");
        crew.claim(&[3]);
        assert!(crew.all_covered(&[1, 3]), "the lead's batch sees 3");
        assert!(
            !crew.all_taken(&[3]),
            "the lead does not skip its own claim"
        );
        assert!(!crew.all_covered(&[3, 4]));
        crew.unclaim();
        assert!(!crew.all_covered(&[3]), "a finished batch claims nothing");
    }

    #[test]
    fn the_crew_remembers_the_latest_ids_taken() {
        let mut taken = Taken::default();
        let kept = Taken::KEPT as i64;
        taken.insert(0..kept + 10);
        assert_eq!(taken.ids.len(), Taken::KEPT);
        assert!(!taken.ids.contains(&9));
        assert!(taken.ids.contains(&10) && taken.ids.contains(&(kept + 9)));
        taken.insert([kept + 9, kept + 9]);
        assert_eq!(taken.order.len(), Taken::KEPT, "an id is kept once");
    }
}
