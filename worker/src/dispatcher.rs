//! The `Dispatcher`: takes read step messages off the dispatch channel and
//! runs each one's handler fire-and-forget, so a slow handler never holds up
//! reading. Each handler runs under its step's timeout with panics caught,
//! and its verdict goes to the completer as a [`Completion`]. Messages that
//! must not run (delivered too often, undecodable) take the poison path
//! instead. The dispatcher never touches the database.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use serde_json::Value;
use shared::message::{ErrorInfo, Outcome, PROTOCOL_VERSION, ResultMessage, StepMessage, reason};
use shared::queue::{QueueMessage, QueueName};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::builtin::unknown_handler_message;
use crate::config::WorkerConfig;
use crate::handler::{Handler, Registry, StepContext, StepError};
use crate::in_flight::InFlight;
use crate::poison;
use crate::step_metrics::StepMetrics;

/// Longest timeout honoured: keeps deadline arithmetic far from overflow
/// whatever a message says.
const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

/// A read message with the slot it occupies; the slot is freed when the
/// message's completion has been handed to the completer.
#[derive(Debug)]
pub struct Delivery {
    pub message: QueueMessage,
    pub permit: OwnedSemaphorePermit,
}

/// What the completer must commit for one step message, together with the
/// message's deletion.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// The handler ran (or could not be found): send its result.
    Done { msg_id: i64, result: ResultMessage },
    /// The message must not run: dead-letter it, and fail its step when the
    /// message says which step it is.
    DeadLetter {
        msg_id: i64,
        dead_letter: Value,
        result: Option<ResultMessage>,
    },
}

impl Completion {
    pub fn msg_id(&self) -> i64 {
        match self {
            Self::Done { msg_id, .. } | Self::DeadLetter { msg_id, .. } => *msg_id,
        }
    }

    pub fn result(&self) -> Option<&ResultMessage> {
        match self {
            Self::Done { result, .. } => Some(result),
            Self::DeadLetter { result, .. } => result.as_ref(),
        }
    }
}

/// The dispatcher's own settings.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// The queue messages come from (named in dead letters).
    pub steps: QueueName,
    /// Where poison messages go (named in failure messages).
    pub dead_letters: QueueName,
    pub worker_id: String,
    pub max_deliveries: i32,
    /// Where handler durations and hop latencies are recorded.
    pub metrics: StepMetrics,
}

impl From<&WorkerConfig> for DispatcherConfig {
    fn from(config: &WorkerConfig) -> Self {
        Self {
            steps: QueueName::steps(&config.namespace),
            dead_letters: QueueName::dead_letters(&config.namespace),
            worker_id: config.worker_id.clone(),
            max_deliveries: config.max_deliveries,
            metrics: StepMetrics::default(),
        }
    }
}

/// What every handler task needs; one copy shared by all of them.
struct Shared {
    registry: Arc<Registry>,
    config: DispatcherConfig,
    in_flight: InFlight,
    completions: mpsc::Sender<Completion>,
}

pub struct Dispatcher {
    shared: Arc<Shared>,
    deliveries: mpsc::Receiver<Delivery>,
    tracker: TaskTracker,
}

impl Dispatcher {
    pub fn new(
        registry: Arc<Registry>,
        config: DispatcherConfig,
        in_flight: InFlight,
        deliveries: mpsc::Receiver<Delivery>,
        completions: mpsc::Sender<Completion>,
    ) -> Self {
        let shared = Arc::new(Shared {
            registry,
            config,
            in_flight,
            completions,
        });
        Self {
            shared,
            deliveries,
            tracker: TaskTracker::new(),
        }
    }

    /// Dispatches until the dispatch channel closes (the reader stopped),
    /// then waits for the running handlers. When `give_up` is cancelled,
    /// running handlers are told to stop and dropped at once, their messages
    /// left to their leases; the dispatcher then returns.
    pub async fn run(mut self, give_up: CancellationToken) {
        loop {
            tokio::select! {
                // Cancel-safe: `recv` loses nothing when dropped.
                delivery = self.deliveries.recv() => match delivery {
                    Some(delivery) => {
                        // The rest of the read, if already here, is
                        // registered before any of it runs: a handler that
                        // ends at once then finds its siblings in flight
                        // (the completion linger waits for them).
                        let mut read = vec![delivery];
                        while let Ok(more) = self.deliveries.try_recv() {
                            read.push(more);
                        }
                        self.dispatch(read, &give_up);
                    }
                    None => break,
                },
                // Cancel-safe: cancellation is a flag.
                () = give_up.cancelled() => break,
            }
        }
        self.tracker.close();
        tokio::select! {
            () = self.tracker.wait() => {}
            () = give_up.cancelled() => {
                self.shared.in_flight.cancel_all();
                // Every task watches `give_up` too, so this is prompt.
                self.tracker.wait().await;
            }
        }
        debug!("dispatcher stopped");
    }

    fn dispatch(&self, read: Vec<Delivery>, give_up: &CancellationToken) {
        let ids: Vec<i64> = read.iter().map(|d| d.message.msg_id).collect();
        let tokens = self.shared.in_flight.insert_read(&ids);
        let registered = read
            .into_iter()
            .zip(tokens)
            .filter_map(|(delivery, token)| {
                if token.is_none() {
                    // Redelivered while its first delivery still runs here (a
                    // lapsed lease): that run will complete it.
                    debug!(
                        msg_id = delivery.message.msg_id,
                        "already running here; delivery skipped"
                    );
                }
                Some((delivery, token?))
            });
        for (Delivery { message, permit }, token) in registered {
            let msg_id = message.msg_id;
            let shared = Arc::clone(&self.shared);
            let give_up = give_up.clone();
            self.tracker.spawn(async move {
                // Held until the completion is handed over, so a slow completer
                // slows reading instead of piling up finished work.
                let _permit = permit;
                tokio::select! {
                    biased;
                    // Cancel-safe: cancellation is a flag. Dropping the handler
                    // loses its result, and the message is left to its lease.
                    () = give_up.cancelled() => warn!(msg_id, "handler given up at the drain deadline; left to its lease"),
                    () = shared.handle(message, token) => {}
                }
            });
        }
    }
}

impl Shared {
    async fn handle(&self, message: QueueMessage, token: CancellationToken) {
        let msg_id = message.msg_id;
        let completion = self.complete(message, token).await;
        if matches!(completion, Completion::Done { .. }) && self.in_flight.is_withdrawn(msg_id) {
            // The orchestrator withdrew the message (the task was cancelled):
            // nobody wants this result.
            debug!(msg_id, "result of a withdrawn step dropped");
            self.in_flight.remove(&[msg_id]);
            return;
        }
        if self.completions.send(completion).await.is_err() {
            warn!(
                msg_id,
                "completer stopped; result dropped and message left to its lease"
            );
        }
    }

    async fn complete(&self, message: QueueMessage, token: CancellationToken) -> Completion {
        let max = self.config.max_deliveries;
        if message.read_ct > max {
            let detail = format!(
                "delivered {} times without a result (the limit is {max}); moved to {}",
                message.read_ct, self.config.dead_letters
            );
            return self.poisoned(&message, reason::DELIVERY_ATTEMPTS_EXHAUSTED, &detail);
        }
        match StepMessage::decode(&message.message) {
            Ok(step) => Completion::Done {
                msg_id: message.msg_id,
                result: self.execute(step, token).await,
            },
            Err(e) => {
                let detail = format!(
                    "cannot decode the step message: {e}; moved to {}",
                    self.config.dead_letters
                );
                self.poisoned(&message, reason::MALFORMED_MESSAGE, &detail)
            }
        }
    }

    fn poisoned(&self, message: &QueueMessage, reason: &str, detail: &str) -> Completion {
        warn!(
            msg_id = message.msg_id,
            read_ct = message.read_ct,
            reason,
            detail,
            "dead-lettering a step message"
        );
        Completion::DeadLetter {
            msg_id: message.msg_id,
            dead_letter: poison::dead_letter(&self.config.steps, message, reason, detail),
            result: poison::failure(&message.message, reason, detail, &self.config.worker_id),
        }
    }

    async fn execute(&self, step: StepMessage, token: CancellationToken) -> ResultMessage {
        let started_at = Utc::now();
        // `step.run` joins the task's trace carried by the message; the result
        // carries this span's context back, so applying it nests under the run.
        let span = info_span!("step.run", task.id = %step.task_id, step.id = %step.step_id, step.name = %step.step,
            handler = %step.handler, attempt = step.attempt);
        shared::trace::set_parent(&span, step.trace.as_ref());
        let trace = shared::trace::inject(&span).or_else(|| step.trace.clone());
        let outcome = match self.registry.get(&step.handler) {
            Some(handler) => run(handler, &step, token).instrument(span).await,
            None => Outcome::Permanent {
                error: ErrorInfo::new(
                    reason::UNKNOWN_HANDLER,
                    unknown_handler_message(&step.handler, &self.registry),
                ),
            },
        };
        let finished_at = Utc::now();
        let seconds = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        self.config.metrics.record(
            &step.namespace,
            &step.handler,
            status(&outcome),
            seconds(started_at - step.enqueued_at),
            seconds(finished_at - started_at),
        );
        ResultMessage {
            v: PROTOCOL_VERSION,
            task_id: step.task_id,
            step_id: step.step_id,
            attempt: step.attempt,
            outcome,
            worker: Some(self.config.worker_id.clone()),
            started_at: Some(started_at),
            finished_at: Some(finished_at),
            trace,
        }
    }
}

/// Runs one handler under its timeout, with panics caught.
async fn run(handler: Arc<dyn Handler>, step: &StepMessage, token: CancellationToken) -> Outcome {
    let timeout = Duration::from_millis(step.timeout_ms).min(MAX_TIMEOUT);
    let deadline = Instant::now() + timeout;
    let ctx = StepContext {
        task_id: step.task_id,
        step_id: step.step_id,
        step: step.step.clone(),
        namespace: step.namespace.clone(),
        handler: step.handler.clone(),
        attempt: step.attempt,
        config: step.config.clone(),
        input: step.input.clone(),
        dependencies: step.dependencies.clone(),
        cancellation: token.clone(),
        deadline,
    };
    debug!("handler started");
    // The call itself is inside the caught future: a handler that panics
    // before returning its future is caught too.
    let call = AssertUnwindSafe(async move { handler.call(ctx).await }).catch_unwind();
    let outcome = match tokio::time::timeout_at(deadline, call).await {
        Ok(Ok(Ok(output))) => Outcome::Success { output },
        Ok(Ok(Err(StepError::Retryable {
            message,
            retry_after,
        }))) => Outcome::Retryable {
            error: ErrorInfo::new(reason::HANDLER_ERROR, message),
            retry_after_ms: retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        },
        Ok(Ok(Err(StepError::Permanent { message }))) => Outcome::Permanent {
            error: ErrorInfo::new(reason::HANDLER_ERROR, message),
        },
        Ok(Err(panic)) => {
            let message = format!("handler panicked: {}", panic_message(&*panic));
            warn!(message, "handler panicked");
            Outcome::Retryable {
                error: ErrorInfo::new(reason::HANDLER_PANICKED, message),
                retry_after_ms: None,
            }
        }
        Err(_elapsed) => {
            // The handler future is dropped; tell anything it spawned, too.
            token.cancel();
            let message = format!("handler ran past its timeout of {} ms", step.timeout_ms);
            Outcome::Retryable {
                error: ErrorInfo::new(reason::TIMEOUT, message),
                retry_after_ms: None,
            }
        }
    };
    debug!(status = status(&outcome), "handler finished");
    outcome
}

fn status(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Success { .. } => "success",
        Outcome::Retryable { .. } => "retryable",
        Outcome::Permanent { .. } => "permanent",
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-string payload)")
}

#[cfg(test)]
#[path = "dispatcher_tests.rs"]
mod tests;
