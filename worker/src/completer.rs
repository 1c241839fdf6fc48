//! The `Completer`: commits completions in batches, one transaction each:
//! results to the result queue, poison messages to the dead-letter queue,
//! and the step messages deleted. A batch that fails is retried, never
//! dropped: until it commits, its messages stay leased by the heartbeat, and
//! a result sent twice is fenced by the orchestrator.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use shared::conn::HeldConnection;
use shared::linger::Linger;
use shared::queue::{self, QueueName};
use sqlx::{Connection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::backoff::Backoff;
use crate::config::WorkerConfig;
use crate::dispatcher::Completion;
use crate::in_flight::InFlight;
use crate::state::WorkerState;

pub struct Completer {
    conn: HeldConnection,
    steps: QueueName,
    dead_letters: QueueName,
    results: QueueName,
    batch_size: usize,
    linger: Duration,
    batch_linger: Linger,
    in_flight: InFlight,
    state: Arc<WorkerState>,
    completions: mpsc::Receiver<Completion>,
}

impl Completer {
    pub fn new(
        pool: PgPool,
        config: &WorkerConfig,
        in_flight: InFlight,
        state: Arc<WorkerState>,
        completions: mpsc::Receiver<Completion>,
    ) -> Self {
        Self {
            conn: HeldConnection::new(pool),
            steps: QueueName::steps(&config.namespace),
            dead_letters: QueueName::dead_letters(&config.namespace),
            results: QueueName::results(),
            batch_size: config.batch_size.max(1),
            linger: config.completion_linger,
            batch_linger: Linger::new(config.batch_linger),
            in_flight,
            state,
            completions,
        }
    }

    /// Commits completions until every sender is gone (the dispatcher and
    /// its handlers finished), so everything finished before shutdown is
    /// sent. `give_up` ends a retry loop that cannot succeed in time: those
    /// messages are left to their leases and will run again elsewhere.
    pub async fn run(mut self, give_up: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        while let Some(first) = self.completions.recv().await {
            let mut batch = vec![first];
            self.take_waiting(&mut batch);
            self.linger_for_siblings(&mut batch, &give_up).await;
            let waited = match self.batch_linger.begin(std::time::Instant::now()) {
                Some(deadline) => {
                    Some(self.linger_for_stream(&mut batch, deadline, &give_up).await)
                }
                None => None,
            };
            loop {
                let attempt = tokio::select! {
                    // Cancel-safe: dropping an open transaction rolls it back.
                    result = self.run_once(&batch) => result,
                    // Cancel-safe: cancellation is a flag.
                    () = give_up.cancelled() => return self.abandon(batch),
                };
                match attempt {
                    Ok(()) => {
                        backoff.reset();
                        self.batch_linger.end(std::time::Instant::now(), waited);
                        break;
                    }
                    Err(e) => {
                        self.conn.discard();
                        self.state.db_error();
                        let delay = backoff.next_delay();
                        warn!(error = %e, batch = batch.len(), retry_in = ?delay, "completing steps failed");
                        tokio::select! {
                            // Cancel-safe: a sleep holds nothing.
                            () = tokio::time::sleep(delay) => {}
                            // Cancel-safe: cancellation is a flag.
                            () = give_up.cancelled() => return self.abandon(batch),
                        }
                    }
                }
            }
        }
        debug!("completer stopped");
    }

    /// Whatever else is already waiting joins the batch: one transaction for
    /// many results when busy, no delay when idle.
    fn take_waiting(&mut self, batch: &mut Vec<Completion>) {
        while batch.len() < self.batch_size {
            match self.completions.try_recv() {
                Ok(completion) => batch.push(completion),
                Err(_) => break,
            }
        }
    }

    /// While a sibling of these results (a message of the same read, such as
    /// the other branch of a diamond) read within the linger is still
    /// running, waits for its result, at most the linger: committed apart,
    /// two results cost the orchestrator two batches, the second waiting on
    /// the task's lock for the first. A result whose siblings have run
    /// longer than the linger, or that has none, goes at once.
    async fn linger_for_siblings(
        &mut self,
        batch: &mut Vec<Completion>,
        give_up: &CancellationToken,
    ) {
        if self.linger.is_zero() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.linger;
        while batch.len() < self.batch_size {
            let in_hand: Vec<i64> = batch.iter().map(Completion::msg_id).collect();
            if !self.in_flight.siblings_running(self.linger, &in_hand) {
                return;
            }
            if !self.join_next(batch, deadline, give_up).await {
                return;
            }
        }
    }

    /// Waits for the next completion until `deadline`; it joins the batch
    /// with whatever else is waiting. False when none came: the deadline
    /// passed, every sender is gone, or `give_up` fired (the batch is then
    /// committed or abandoned by the caller, which watches it too).
    async fn join_next(
        &mut self,
        batch: &mut Vec<Completion>,
        deadline: tokio::time::Instant,
        give_up: &CancellationToken,
    ) -> bool {
        let received = tokio::select! {
            // Cancel-safe: a completion not yet received stays in the channel.
            received = tokio::time::timeout_at(deadline, self.completions.recv()) => received,
            // Cancel-safe: cancellation is a flag.
            () = give_up.cancelled() => return false,
        };
        match received {
            Ok(Some(completion)) => {
                batch.push(completion);
                self.take_waiting(batch);
                true
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// While results of other steps stream in (see [`shared::linger`]), waits
    /// for more until `deadline` or a full batch; whether any came.
    async fn linger_for_stream(
        &mut self,
        batch: &mut Vec<Completion>,
        deadline: std::time::Instant,
        give_up: &CancellationToken,
    ) -> bool {
        let before = batch.len();
        let deadline = tokio::time::Instant::from_std(deadline);
        while batch.len() < self.batch_size
            && !Linger::full(batch.len())
            && self.join_next(batch, deadline, give_up).await
        {}
        batch.len() > before
    }

    /// Commits one batch in one transaction. Results of withdrawn steps are
    /// not sent (nobody wants them), but their messages are deleted all the same.
    /// The connection is the one the completer holds (a fresh one after a failure).
    pub async fn run_once(&mut self, batch: &[Completion]) -> Result<(), sqlx::Error> {
        let results: Vec<Value> = batch
            .iter()
            .filter(|c| !self.in_flight.is_withdrawn(c.msg_id()))
            .filter_map(Completion::result)
            .map(|r| r.to_value())
            .collect();
        let dead: Vec<Value> = batch
            .iter()
            .filter_map(|c| match c {
                Completion::DeadLetter { dead_letter, .. } => Some(dead_letter.clone()),
                Completion::Done { .. } => None,
            })
            .collect();
        let ids: Vec<i64> = batch.iter().map(Completion::msg_id).collect();

        // A message already gone (withdrawn, or redelivered and completed
        // elsewhere) deletes nothing; its result is sent anyway, and fenced.
        let conn = self.conn.get().await?;
        let deleted = if dead.is_empty() {
            queue::complete(&mut *conn, &self.steps, &ids, &self.results, &results).await?
        } else {
            let mut tx = conn.begin().await?;
            if !results.is_empty() {
                queue::send_batch(&mut *tx, &self.results, &results).await?;
            }
            queue::send_batch(&mut *tx, &self.dead_letters, &dead).await?;
            let deleted = queue::delete_batch(&mut *tx, &self.steps, &ids).await?;
            tx.commit().await?;
            deleted.len() as i64
        };

        self.state.db_ok();
        for completion in batch {
            if let Some(result) = completion.result() {
                self.state.outcome(&result.outcome);
            }
            if matches!(completion, Completion::DeadLetter { .. }) {
                self.state.dead_letter();
            }
        }
        self.in_flight.remove(&ids);
        debug!(
            results = results.len(),
            dead_letters = dead.len(),
            deleted,
            "steps completed"
        );
        Ok(())
    }

    /// Gives up on `batch` and whatever is still queued behind it.
    fn abandon(mut self, mut batch: Vec<Completion>) {
        self.completions.close();
        while let Ok(completion) = self.completions.try_recv() {
            batch.push(completion);
        }
        let msg_ids: Vec<i64> = batch.iter().map(Completion::msg_id).collect();
        error!(
            ?msg_ids,
            "could not commit results before the drain deadline; their steps will run again after their leases"
        );
    }
}
