//! The dispatcher driven through its channels, without a database: what
//! result each kind of step produces, and that slots are always given back.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use shared::{StepId, TaskId};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::*;
use crate::builtin;

const SLOTS: usize = 4;

struct Harness {
    deliveries: mpsc::Sender<Delivery>,
    completions: mpsc::Receiver<Completion>,
    slots: Arc<Semaphore>,
    in_flight: InFlight,
    give_up: CancellationToken,
    dispatcher: JoinHandle<()>,
    next_id: i64,
}

fn registry(allow_exec: bool) -> Registry {
    let mut registry = Registry::default();
    builtin::register(&mut registry, allow_exec, reqwest::Client::new());
    registry.insert(
        "test.panic",
        Arc::new(|ctx: StepContext| async move {
            if ctx.attempt > 0 {
                panic!("boom on attempt {}", ctx.attempt);
            }
            Ok(Value::Null)
        }),
    );
    // Ignores its cancellation token: only dropping it stops it.
    registry.insert(
        "test.stubborn",
        Arc::new(|_ctx: StepContext| std::future::pending()),
    );
    registry
}

fn harness(registry: Registry) -> Harness {
    let (deliveries, deliveries_rx) = mpsc::channel(SLOTS);
    let (completions_tx, completions) = mpsc::channel(SLOTS * 2);
    let in_flight = InFlight::default();
    let namespace = shared::Namespace::parse("shop").expect("valid namespace");
    let mut config = WorkerConfig::new(namespace);
    config.worker_id = "w1".into();
    let dispatcher = Dispatcher::new(
        Arc::new(registry),
        (&config).into(),
        in_flight.clone(),
        deliveries_rx,
        completions_tx,
    );
    let give_up = CancellationToken::new();
    let dispatcher = tokio::spawn(dispatcher.run(give_up.clone()));
    Harness {
        deliveries,
        completions,
        slots: Arc::new(Semaphore::new(SLOTS)),
        in_flight,
        give_up,
        dispatcher,
        next_id: 100,
    }
}

fn step(handler: &str, config: Value) -> Value {
    json!({
        "v": 1, "task_id": TaskId::new(), "step_id": StepId::new(), "step": "charge",
        "namespace": "shop", "handler": handler, "attempt": 2,
        "config": config, "input": {"order": 7}, "dependencies": {},
        "timeout_ms": 1000, "enqueued_at": "2026-01-01T00:00:00Z",
        "trace": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    })
}

impl Harness {
    async fn deliver(&self, msg_id: i64, read_ct: i32, message: Value) {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("open semaphore");
        let message = QueueMessage {
            msg_id,
            read_ct,
            enqueued_at: Utc::now(),
            message,
        };
        self.deliveries
            .send(Delivery { message, permit })
            .await
            .expect("dispatcher running");
    }

    async fn next(&mut self) -> Completion {
        let next = tokio::time::timeout(Duration::from_secs(10), self.completions.recv());
        next.await
            .expect("a completion in time")
            .expect("channel open")
    }

    /// One step through the dispatcher, as a new message: its completion.
    async fn run(&mut self, message: Value) -> Completion {
        // Nothing completes messages here, so each one needs a fresh id: the
        // dispatcher skips a message it already holds.
        self.next_id += 1;
        self.deliver(self.next_id, 1, message).await;
        self.next().await
    }

    /// Closes the dispatch channel and waits for the dispatcher, checking that
    /// every slot came back and nothing more was completed.
    async fn finish(mut self) {
        drop(self.deliveries);
        self.dispatcher.await.expect("dispatcher did not panic");
        assert_eq!(
            self.slots.available_permits(),
            SLOTS,
            "every slot is given back"
        );
        assert_eq!(
            self.completions.recv().await,
            None,
            "no further completions"
        );
    }
}

fn outcome(completion: &Completion) -> &Outcome {
    &completion.result().expect("a result").outcome
}

fn error(completion: &Completion) -> &ErrorInfo {
    match outcome(completion) {
        Outcome::Retryable { error, .. } | Outcome::Permanent { error } => error,
        Outcome::Success { .. } => panic!("expected a failure, got {completion:?}"),
    }
}

#[tokio::test]
async fn success_carries_the_output_and_the_step_identity() {
    let mut h = harness(registry(false));
    let message = step("builtin.noop", json!({"a": 1}));
    let Completion::Done { msg_id, result } = h.run(message.clone()).await else {
        panic!("expected a result")
    };
    assert_eq!(msg_id, 101);
    assert_eq!(
        result.task_id.to_string(),
        message["task_id"].as_str().expect("id")
    );
    assert_eq!(
        result.step_id.to_string(),
        message["step_id"].as_str().expect("id")
    );
    assert_eq!(result.attempt, 2);
    assert_eq!(result.worker.as_deref(), Some("w1"));
    assert_eq!(
        result.trace,
        Some(message["trace"].clone()),
        "the trace context travels back"
    );
    assert!(result.started_at <= result.finished_at);
    assert_eq!(
        result.outcome,
        Outcome::Success {
            output: json!({"config": {"a": 1}, "input": {"order": 7}, "dependencies": {}})
        }
    );
    h.finish().await;
}

#[tokio::test]
async fn handler_failures_keep_their_kind_and_retry_after() {
    let mut h = harness(registry(false));
    let retryable = h
        .run(step("builtin.fail", json!({"retry_after_ms": 500})))
        .await;
    assert_eq!(
        outcome(&retryable),
        &Outcome::Retryable {
            error: ErrorInfo::new(
                reason::HANDLER_ERROR,
                "builtin.fail: failing attempt 2 on purpose"
            ),
            retry_after_ms: Some(500),
        }
    );
    let permanent = h
        .run(step("builtin.fail", json!({"mode": "permanent"})))
        .await;
    assert_eq!(
        outcome(&permanent),
        &Outcome::Permanent {
            error: ErrorInfo::new(
                reason::HANDLER_ERROR,
                "builtin.fail: failing attempt 2 on purpose"
            )
        }
    );
    h.finish().await;
}

#[tokio::test]
async fn unknown_handlers_fail_permanently_naming_the_handler() {
    let mut h = harness(registry(false));
    let completion = h.run(step("shop.charge", Value::Null)).await;
    assert!(matches!(outcome(&completion), Outcome::Permanent { .. }));
    let error = error(&completion);
    assert_eq!(error.reason, reason::UNKNOWN_HANDLER);
    assert!(
        error
            .message
            .starts_with("no handler named \"shop.charge\" is registered"),
        "{}",
        error.message
    );
    h.finish().await;
}

#[tokio::test]
async fn exec_is_refused_unless_allowed() {
    let mut h = harness(registry(false));
    let completion = h
        .run(step("builtin.exec", json!({"command": ["true"]})))
        .await;
    assert!(matches!(outcome(&completion), Outcome::Permanent { .. }));
    assert_eq!(error(&completion).reason, reason::UNKNOWN_HANDLER);
    assert!(error(&completion).message.contains("--allow-exec"));
    h.finish().await;

    let mut h = harness(registry(true));
    let completion = h
        .run(step(
            "builtin.exec",
            json!({"command": ["sh", "-c", "echo '{\"ok\": true}'"]}),
        ))
        .await;
    assert_eq!(
        outcome(&completion),
        &Outcome::Success {
            output: json!({"ok": true})
        }
    );
    h.finish().await;
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered() {
    let mut h = harness(registry(false));
    // Decodes far enough to name the step: its step fails too.
    let mut newer = step("builtin.noop", Value::Null);
    newer["v"] = json!(2);
    h.deliver(7, 1, newer.clone()).await;
    let Completion::DeadLetter {
        msg_id,
        dead_letter,
        result,
    } = h.next().await
    else {
        panic!("expected a dead letter")
    };
    assert_eq!(msg_id, 7);
    assert_eq!(dead_letter["reason"], reason::MALFORMED_MESSAGE);
    assert_eq!(dead_letter["queue"], "weft_steps_shop");
    assert_eq!(
        (
            dead_letter["msg_id"].clone(),
            dead_letter["read_ct"].clone()
        ),
        (json!(7), json!(1))
    );
    assert_eq!(dead_letter["message"], newer);
    let result = result.expect("the step is named");
    assert_eq!(result.attempt, 2);
    let Outcome::Permanent { error } = result.outcome else {
        panic!("expected a permanent failure")
    };
    assert_eq!(error.reason, reason::MALFORMED_MESSAGE);
    assert_eq!(
        error.message,
        "cannot decode the step message: unsupported protocol version 2 (this build speaks version 1); \
         moved to weft_dlq_shop"
    );

    // Names no step: dead-lettered only.
    h.deliver(8, 1, json!("garbage")).await;
    let Completion::DeadLetter {
        msg_id: 8,
        result: None,
        ..
    } = h.next().await
    else {
        panic!("expected a dead letter")
    };
    h.finish().await;
}

#[tokio::test]
async fn messages_delivered_too_often_are_dead_lettered_without_running() {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = registry(false);
    let counter = Arc::clone(&runs);
    registry.insert(
        "test.count",
        Arc::new(move |_ctx: StepContext| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(Value::Null) }
        }),
    );
    let mut h = harness(registry);
    h.deliver(3, 5, step("test.count", Value::Null)).await;
    assert!(
        matches!(h.next().await, Completion::Done { .. }),
        "the fifth delivery still runs"
    );
    h.deliver(4, 6, step("test.count", Value::Null)).await;
    let completion = h.next().await;
    let Completion::DeadLetter { dead_letter, .. } = &completion else {
        panic!("expected a dead letter")
    };
    assert_eq!(dead_letter["reason"], reason::DELIVERY_ATTEMPTS_EXHAUSTED);
    assert_eq!(
        error(&completion),
        &ErrorInfo::new(
            reason::DELIVERY_ATTEMPTS_EXHAUSTED,
            "delivered 6 times without a result (the limit is 5); moved to weft_dlq_shop"
        )
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    h.finish().await;
}

#[tokio::test]
async fn panics_are_caught_and_retryable() {
    let mut h = harness(registry(false));
    let completion = h.run(step("test.panic", Value::Null)).await;
    assert_eq!(
        outcome(&completion),
        &Outcome::Retryable {
            error: ErrorInfo::new(
                reason::HANDLER_PANICKED,
                "handler panicked: boom on attempt 2"
            ),
            retry_after_ms: None
        }
    );
    h.finish().await;
}

#[tokio::test(start_paused = true)]
async fn the_timeout_is_enforced() {
    let mut h = harness(registry(false));
    let started = Instant::now();
    // Sleeps a minute, with a one-second timeout.
    let completion = h.run(step("builtin.sleep", json!({"ms": 60_000}))).await;
    assert_eq!(
        outcome(&completion),
        &Outcome::Retryable {
            error: ErrorInfo::new(reason::TIMEOUT, "handler ran past its timeout of 1000 ms"),
            retry_after_ms: None
        }
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    // A handler that ignores its token is dropped all the same.
    let completion = h.run(step("test.stubborn", Value::Null)).await;
    assert_eq!(error(&completion).reason, reason::TIMEOUT);
    h.finish().await;
}

#[tokio::test]
async fn results_of_withdrawn_steps_are_dropped() {
    let h = harness(registry(false));
    let mut message = step("builtin.sleep", json!({"ms": 60_000}));
    message["timeout_ms"] = json!(120_000);
    h.deliver(5, 1, message).await;
    // Wait until it runs, then withdraw it as the heartbeat would.
    while h.in_flight.is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.in_flight.withdraw_missing(&[5], &[]), vec![5]);
    h.finish().await;
}

#[tokio::test(start_paused = true)]
async fn giving_up_drops_running_handlers() {
    let h = harness(registry(false));
    let mut message = step("test.stubborn", Value::Null);
    message["timeout_ms"] = json!(3_600_000);
    h.deliver(6, 1, message).await;
    while h.in_flight.is_empty() {
        tokio::task::yield_now().await;
    }
    h.give_up.cancel();
    let in_flight = h.in_flight.clone();
    h.finish().await;
    assert_eq!(
        in_flight.ids(),
        vec![6],
        "left to its lease, and reported as left"
    );
}
