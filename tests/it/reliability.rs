//! Faults with real processes and real signals: worker and orchestrator
//! deaths, fencing, poison messages and dead letters, cancellation,
//! timeouts, operator repair and `weft check`.

use std::time::{Duration, Instant};

use serde_json::json;
use shared::queue::{self, QueueName};
use shared::{Namespace, StepState, TaskState};

use crate::fleet::{self, Fleet, Proc};
use crate::support;

const LONG: Duration = Duration::from_secs(60);

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A worker killed mid-handler loses its lease; another worker gets the step
/// within the lease time and completes it; the books show one result.
#[tokio::test]
async fn worker_killed_mid_handler_is_redelivered() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(
        &pool,
        "namespace: crash\nname: slow\nversion: 1\nsteps:\n  - { name: a, handler: builtin.sleep, config: { ms: 1500 } }\n",
    )
    .await;
    let _orchestrator = Proc::orchestrator(&url);
    let victim = Proc::worker(&url, "crash", &["--lease", "2s"]);
    let ids: Vec<_> = futures_util::future::join_all(
        (0..5).map(|_| fleet::create(&pool, "crash", "slow", json!({}))),
    )
    .await;
    let busy = support::wait_until(LONG, || async {
        count(
            &pool,
            "select in_flight from weft.queue_stats() where queue_name = 'weft_steps_crash'",
        )
        .await
            == 5
    })
    .await;
    assert!(busy, "the victim never held the steps");
    victim.signal("KILL");
    let killed_at = Instant::now();
    let _survivor = Proc::worker(&url, "crash", &["--lease", "2s"]);
    for id in ids {
        assert_eq!(
            fleet::wait_final(&pool, id, LONG).await,
            TaskState::Complete
        );
    }
    let redelivered_within = killed_at.elapsed();
    println!(
        "redelivered and completed {:.2}s after the kill",
        redelivered_within.as_secs_f64()
    );
    assert!(redelivered_within < Duration::from_secs(15));
    assert_eq!(
        count(&pool, "select count(*) from weft.steps where attempts <> 1").await,
        0,
        "one attempt each"
    );
    fleet::check_books(&pool).await;
}

/// An orchestrator killed while results flow leaves its leased results to
/// reappear; another orchestrator applies them; no task is stuck.
#[tokio::test]
async fn orchestrator_killed_mid_batch_loses_nothing() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(
        &pool,
        "namespace: crash\nname: two\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n  - { name: b, handler: builtin.noop, depends_on: [a] }\n",
    )
    .await;
    let victim = Proc::spawn(
        &[
            "orchestrator",
            "--http-addr",
            &format!("127.0.0.1:{}", fleet::free_port()),
            "--result-lease",
            "2s",
        ],
        &url,
    );
    let _worker = Proc::worker(&url, "crash", &[]);
    let requests: Vec<_> = (0..300)
        .map(|i| orchestrator::tasks::CreateTask {
            namespace: "crash".into(),
            name: "two".into(),
            version: None,
            input: json!({ "i": i }),
            priority: 0,
            idempotency_key_hash: None,
            request_hash: None,
        })
        .collect();
    orchestrator::tasks::create_tasks(&pool, &Default::default(), &requests)
        .await
        .unwrap();
    // Kill it once it has applied some results but not all.
    let midway = support::wait_until(LONG, || async {
        count(
            &pool,
            "select count(*) from weft.tasks where state = 'complete'",
        )
        .await
            >= 20
    })
    .await;
    assert!(midway);
    victim.signal("KILL");
    let _successor = Proc::spawn(
        &[
            "orchestrator",
            "--http-addr",
            &format!("127.0.0.1:{}", fleet::free_port()),
            "--result-lease",
            "2s",
        ],
        &url,
    );
    fleet::wait_all_final(&pool, LONG).await;
    assert_eq!(
        count(
            &pool,
            "select count(*) from weft.tasks where state = 'complete'"
        )
        .await,
        300
    );
    fleet::check_books(&pool).await;
    let report = orchestrator::store::check_invariants(&pool, Duration::ZERO)
        .await
        .unwrap();
    assert!(report.iter().all(|c| c.violations == 0), "{report:?}");
}

/// A duplicate result and a result of an old attempt are acknowledged and
/// dropped, never applied, counted, and visible in the task's history.
#[tokio::test]
async fn late_and_duplicate_results_are_fenced_off() {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "namespace: fence\nname: one\nversion: 1\ndefaults:\n  retry: { max_attempts: 3, backoff: { initial: 1ms, max: 1ms } }\nsteps:\n  - { name: a, handler: builtin.fail, config: { mode: retryable, times: 1 } }\n",
    )
    .await;
    let fleet = Fleet::start(&pool, 1, &["fence"]);
    let id = fleet::create(&pool, "fence", "one", json!({})).await;
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Complete
    );
    fleet.stop().await;
    let step = fleet::step(&fleet::steps(&pool, id).await, "a").id;
    // The first attempt failed, the second succeeded. Now a late success of
    // attempt 1 and a duplicate of attempt 2 arrive.
    let late = json!({ "v": 1, "task_id": id, "step_id": step, "attempt": 1, "status": "success", "output": {"late": true} });
    let duplicate = json!({ "v": 1, "task_id": id, "step_id": step, "attempt": 2, "status": "permanent",
                            "error": { "message": "duplicate", "reason": "handler_error" } });
    queue::send_batch(&pool, &QueueName::results(), &[late, duplicate])
        .await
        .unwrap();
    let metrics = orchestrator::Metrics::default();
    let mut collector = orchestrator::Collector::new(
        pool.clone(),
        fleet::orchestrator_config().collector,
        metrics.clone(),
    );
    let collected = collector.run_once().await.unwrap();
    assert_eq!(
        (collected.read, collected.applied, collected.stale),
        (2, 0, 2)
    );
    assert_eq!(metrics.stale_results(), 2);
    assert!(
        metrics
            .render()
            .contains("weft_stale_results_dropped_total 2")
    );
    let after = fleet::step(&fleet::steps(&pool, id).await, "a").clone();
    assert_eq!(after.state, StepState::Complete);
    assert_eq!(
        after.output.unwrap()["config"]["times"],
        json!(1),
        "the late output was not applied"
    );
    let history = orchestrator::store::task_history(&pool, id).await.unwrap();
    let stale: Vec<_> = history
        .iter()
        .filter(|h| h.kind == "stale_result")
        .collect();
    assert_eq!(stale.len(), 2, "{history:#?}");
    assert_eq!(
        count(&pool, "select count(*) from pgmq.q_weft_results").await,
        0,
        "both were acknowledged"
    );
}

/// A malformed step message, one of an unknown version, and one whose
/// handler crashes the worker process every time all end in the dead-letter
/// queue with their reason; identifiable steps fail with that reason; the
/// worker keeps serving the rest; a dead letter can be replayed.
#[tokio::test]
async fn poison_messages_are_dead_lettered_and_replayable() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    let marker = std::env::temp_dir().join(format!("weft-crash-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&marker, "crash").unwrap();
    let crash = format!(
        "namespace: poison\nname: crash\nversion: 1\nsteps:\n  - name: a\n    handler: builtin.exec\n    config: {{ command: [sh, -c, 'if [ -e {} ]; then kill -9 $PPID; sleep 5; fi; echo {{}}'] }}\n  - {{ name: b, handler: builtin.noop, depends_on: [a] }}\n",
        marker.display()
    );
    fleet::register(&pool, &crash).await;
    fleet::register(&pool, "namespace: poison\nname: fine\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n").await;
    let _orchestrator = Proc::orchestrator(&url);
    let queue = QueueName::steps(&Namespace::parse("poison").unwrap());
    let crashing = fleet::create(&pool, "poison", "crash", json!({})).await;
    let worker_args = ["--lease", "1s", "--max-deliveries", "2", "--allow-exec"];
    // Each worker dies on the crashing step; start another until the step is dead-lettered.
    let mut deaths = 0;
    let deadline = Instant::now() + LONG;
    loop {
        let mut worker = Proc::worker(&url, "poison", &worker_args);
        let exited = tokio::time::timeout(Duration::from_secs(5), worker.child.wait()).await;
        if exited.is_ok() {
            deaths += 1;
        }
        let state = fleet::task_state(&pool, crashing).await;
        if state == TaskState::Error {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the crashing step was never dead-lettered"
        );
    }
    assert!(deaths >= 2, "the handler crashed the worker {deaths} times");
    let a = fleet::step(&fleet::steps(&pool, crashing).await, "a").clone();
    assert_eq!(a.state, StepState::Error);
    assert_eq!(
        a.last_error.as_ref().unwrap()["reason"],
        json!("delivery_attempts_exhausted")
    );
    // A healthy worker keeps serving the rest.
    let _worker = Proc::worker(&url, "poison", &worker_args);
    // Garbage and an unknown protocol version, straight onto the queue.
    queue::send_batch(
        &pool,
        &queue,
        &[json!({"hello": "world"}), json!({"v": 99, "task_id": "x"})],
    )
    .await
    .unwrap();
    let fine = fleet::create(&pool, "poison", "fine", json!({})).await;
    assert_eq!(
        fleet::wait_final(&pool, fine, LONG).await,
        TaskState::Complete
    );
    let all_dead = support::wait_until(LONG, || async {
        orchestrator::store::list_dead_letters(&pool, 100)
            .await
            .unwrap()
            .len()
            == 3
    })
    .await;
    assert!(all_dead, "three dead letters expected");
    let letters = orchestrator::store::list_dead_letters(&pool, 100)
        .await
        .unwrap();
    let reasons: Vec<&str> = letters
        .iter()
        .filter_map(|l| l.message["reason"].as_str())
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "malformed_message")
            .count(),
        2,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "delivery_attempts_exhausted")
            .count(),
        1,
        "{reasons:?}"
    );
    // Replay: the step runs again as a new attempt in its place in the DAG.
    std::fs::remove_file(&marker).unwrap();
    let letter = letters
        .iter()
        .find(|l| l.message["reason"] == "delivery_attempts_exhausted")
        .unwrap();
    let replayed = orchestrator::operator::replay_dead_letter(&pool, &letter.queue, letter.msg_id)
        .await
        .unwrap();
    assert!(
        matches!(replayed, orchestrator::operator::Replayed::Step { .. }),
        "{replayed:?}"
    );
    assert_eq!(
        fleet::wait_final(&pool, crashing, LONG).await,
        TaskState::Complete
    );
    let steps = fleet::steps(&pool, crashing).await;
    assert_eq!(
        fleet::step(&steps, "b").state,
        StepState::Complete,
        "dependents ran after the replay"
    );
    // A malformed dead letter cannot be replayed, and says why.
    let garbage = letters
        .iter()
        .find(|l| l.message["reason"] == "malformed_message")
        .unwrap();
    let refused = orchestrator::operator::replay_dead_letter(&pool, &garbage.queue, garbage.msg_id)
        .await
        .unwrap();
    assert!(
        matches!(refused, orchestrator::operator::Replayed::Refused(_)),
        "{refused:?}"
    );
}

/// Result messages that cannot be decoded are moved to the result
/// dead-letter queue, never dropped, and the rest of the batch is applied,
/// including a well-formed message the batch statement leaves to the
/// decoder (a braced uuid).
#[tokio::test]
async fn malformed_results_are_dead_lettered() {
    let pool = support::fresh_pool().await;
    let unknown = uuid::Uuid::now_v7();
    queue::send_batch(
        &pool,
        &QueueName::results(),
        &[
            json!("garbage"),
            json!({"v": 1, "task_id": "nope"}),
            json!({"v": 1, "task_id": unknown, "step_id": unknown, "attempt": 1, "status": "success"}),
            json!({"v": 1, "task_id": format!("{{{unknown}}}"), "step_id": unknown, "attempt": 2,
                   "status": "success"}),
        ],
    )
    .await
    .unwrap();
    let mut collector = orchestrator::Collector::new(
        pool.clone(),
        fleet::orchestrator_config().collector,
        Default::default(),
    );
    let collected = collector.run_once().await.unwrap();
    assert_eq!(
        (collected.read, collected.malformed, collected.stale),
        (4, 2, 2),
        "{collected:?}"
    );
    assert_eq!(
        count(&pool, "select count(*) from pgmq.q_weft_results_dlq").await,
        2
    );
    assert_eq!(
        count(&pool, "select count(*) from weft.stale_results").await,
        2,
        "both results of the unknown step were acknowledged as stale"
    );
    assert_eq!(
        count(&pool, "select count(*) from pgmq.q_weft_results").await,
        0
    );
}

/// A result the database refuses whatever batch it is in fails its batch
/// once; the next pass applies the batch one result at a time, dead-letters
/// that one with the database's reason, and applies the others.
#[tokio::test]
async fn a_result_that_fails_every_batch_is_isolated() {
    let pool = support::fresh_pool().await;
    // The poison: recording this result raises, as a bug or a broken
    // extension would.
    sqlx::raw_sql(
        "create function public.refuse_attempt_666() returns trigger language plpgsql as $$
         begin
             if new.attempt = 666 then raise exception 'attempt 666 refused'; end if;
             return new;
         end $$;
         create trigger refuse_attempt_666 before insert on weft.stale_results
             for each row execute function public.refuse_attempt_666();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let unknown = uuid::Uuid::now_v7();
    let result = |attempt: i32| json!({"v": 1, "task_id": unknown, "step_id": unknown, "attempt": attempt, "status": "success"});
    queue::send_batch(
        &pool,
        &QueueName::results(),
        &[result(1), result(666), result(2)],
    )
    .await
    .unwrap();
    let mut collector = orchestrator::Collector::new(
        pool.clone(),
        fleet::orchestrator_config().collector,
        Default::default(),
    );
    let failed = collector.run_once().await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(
        count(&pool, "select count(*) from pgmq.q_weft_results").await,
        3,
        "the failed batch took nothing"
    );
    let collected = collector.run_once().await.unwrap();
    assert_eq!(
        (collected.read, collected.malformed, collected.stale),
        (3, 1, 2),
        "{collected:?}"
    );
    let dead: serde_json::Value = sqlx::query_scalar("select message from pgmq.q_weft_results_dlq")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead["reason"], "apply_failed");
    assert_eq!(dead["message"]["attempt"], 666);
    assert!(
        dead["detail"]
            .as_str()
            .unwrap()
            .contains("attempt 666 refused"),
        "{dead}"
    );
    assert_eq!(
        count(&pool, "select count(*) from pgmq.q_weft_results").await,
        0
    );
    // Back to batches: the next result goes through the one-statement path.
    queue::send_batch(&pool, &QueueName::results(), &[result(3)])
        .await
        .unwrap();
    let collected = collector.run_once().await.unwrap();
    assert_eq!((collected.read, collected.stale), (1, 1));
}

/// The batch statement applies a result message only when the protocol's
/// decoder would accept it, and then as the decoder reads it: checked over
/// every field of each kind of result set to each of a range of values.
#[tokio::test]
async fn the_batch_statement_accepts_only_what_the_decoder_accepts() {
    use shared::message::ResultMessage;
    let pool = support::fresh_pool().await;
    let id = "0190b3a5-6d1c-7000-8000-00000000000a";
    let error = json!({"message": "boom", "reason": "handler_error"});
    let bases = [
        json!({"v": 1, "task_id": id, "step_id": id, "attempt": 1, "status": "success",
               "output": {"ok": true}, "worker": "w-1", "started_at": "2026-11-29T01:02:03.123456789Z",
               "finished_at": "2026-11-29T01:02:03Z", "trace": {"traceparent": "00-x"}}),
        json!({"v": 1, "task_id": id, "step_id": id, "attempt": 2, "status": "retryable",
               "error": error, "retry_after_ms": 250}),
        json!({"v": 1, "task_id": id, "step_id": id, "attempt": 3, "status": "permanent",
               "error": error}),
    ];
    let values = [
        None,
        Some(json!(null)),
        Some(json!(true)),
        Some(json!(0)),
        Some(json!(1)),
        Some(json!(-1)),
        Some(json!(1.0)),
        Some(json!(1.5)),
        Some(json!(999_999_999)),
        Some(json!(1_000_000_000)),
        Some(json!(2_147_483_648_i64)),
        Some(json!(9_223_372_036_854_775_807_i64)),
        Some(json!(18_446_744_073_709_551_615_u64)),
        Some(json!("")),
        Some(json!("x")),
        Some(json!("1")),
        Some(json!(id)),
        Some(json!(id.to_uppercase())),
        Some(json!(format!("{{{id}}}"))),
        Some(json!(id.replace('-', ""))),
        Some(json!("2026-01-01T00:00:00Z")),
        Some(json!("2026-02-29T00:00:00Z")),
        Some(json!("2028-02-29T23:59:59.5+05:30")),
        Some(json!("2026-04-31T00:00:00Z")),
        Some(json!("2026-01-01 00:00:00Z")),
        Some(json!("2026-13-01T00:00:00Z")),
        Some(json!("2026-01-01T24:00:00Z")),
        Some(json!("success")),
        Some(json!("retryable")),
        Some(json!("permanent")),
        Some(json!({})),
        Some(json!([])),
        Some(error.clone()),
        Some(json!({"message": 1, "reason": "r"})),
        Some(json!({"message": "m"})),
    ];
    let fields = [
        "v",
        "task_id",
        "step_id",
        "attempt",
        "status",
        "output",
        "error",
        "retry_after_ms",
        "worker",
        "started_at",
        "finished_at",
        "trace",
    ];
    let mut messages = vec![json!("garbage"), json!([1]), json!(null)];
    for base in &bases {
        messages.push(base.clone());
        for field in fields {
            for value in &values {
                let mut m = base.clone();
                match value {
                    Some(v) => m[field] = v.clone(),
                    None => {
                        m.as_object_mut().unwrap().remove(field);
                    }
                }
                messages.push(m);
            }
        }
    }
    let checked: Vec<Option<serde_json::Value>> = sqlx::query_scalar(
        "select weft.checked_result(m) from unnest($1::jsonb[]) with ordinality u(m, i) order by i",
    )
    .bind(&messages)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(checked.len(), messages.len());
    let mut accepted = 0;
    for (message, checked) in messages.iter().zip(&checked) {
        let decoded = ResultMessage::decode(message);
        let Some(checked) = checked else { continue };
        accepted += 1;
        let decoded = decoded.unwrap_or_else(|e| {
            panic!("the statement accepted what the decoder refuses ({e}): {message}")
        });
        assert_eq!(
            ResultMessage::decode(checked).as_ref(),
            Ok(&decoded),
            "read differently: {message} became {checked}"
        );
    }
    // What workers write, and the usual variations of it, take the fast
    // path (the rest goes to the decoder, which is slower but as correct).
    let mut usual: Vec<serde_json::Value> = bases.to_vec();
    let mut vary = |base: usize, field: &str, value: Option<serde_json::Value>| {
        let mut m = bases[base].clone();
        match value {
            Some(v) => m[field] = v,
            None => {
                m.as_object_mut().unwrap().remove(field);
            }
        }
        usual.push(m);
    };
    vary(0, "task_id", Some(json!(id.to_uppercase())));
    vary(0, "output", None);
    vary(0, "worker", Some(json!(null)));
    vary(0, "started_at", Some(json!("2028-02-29T23:59:59.5+05:30")));
    vary(0, "trace", None);
    vary(1, "retry_after_ms", None);
    vary(1, "retry_after_ms", Some(json!(0)));
    vary(2, "attempt", Some(json!(999_999_999)));
    for m in &usual {
        let i = messages.iter().position(|x| x == m).unwrap();
        assert!(
            checked[i].is_some(),
            "not taken by the batch statement: {m}"
        );
    }
    assert!(accepted >= usual.len());
}

/// Cancelling a task cancels its pending and waiting steps, withdraws queued
/// messages, stops the running handler through its token, and drops its late
/// result. A cancelled task never runs another step.
#[tokio::test]
async fn cancellation_withdraws_and_stops_everything() {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "namespace: cancel\nname: long\nversion: 1\nsteps:\n  - { name: a, handler: builtin.sleep, config: { ms: 30000 } }\n  - { name: b, handler: builtin.noop, depends_on: [a] }\n  - { name: c, handler: builtin.sleep, config: { ms: 30000 } }\n",
    )
    .await;
    // The worker serves one slot, so `c` stays queued while `a` runs.
    let mut config = fleet::worker_config("cancel");
    config.concurrency = 1;
    let worker = worker::Worker::builder(config).build();
    let state = worker.state();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker_task = tokio::spawn(worker.run(pool.clone(), shutdown.clone()));
    let orchestrator_task = tokio::spawn(orchestrator::run(
        fleet::orchestrator_config(),
        pool.clone(),
        shutdown.clone(),
    ));
    let id = fleet::create(&pool, "cancel", "long", json!({})).await;
    let running = support::wait_until(LONG, || async { state.slots_busy() == 1 }).await;
    assert!(running);
    let started = Instant::now();
    let (task_state, applied) = orchestrator::operator::cancel(&pool, id, Some("test"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((task_state, applied), (TaskState::Cancelled, true));
    // The running handler learns it at its next lease extension (1 s here).
    let stopped = support::wait_until(Duration::from_secs(10), || async {
        state.slots_busy() == 0
    })
    .await;
    assert!(stopped, "the running handler was not cancelled");
    println!(
        "handler stopped {:.2}s after the cancel",
        started.elapsed().as_secs_f64()
    );
    let steps = fleet::steps(&pool, id).await;
    assert!(
        steps.iter().all(|s| s.state == StepState::Cancelled),
        "{steps:#?}"
    );
    assert_eq!(
        count(&pool, "select count(*) from pgmq.q_weft_steps_cancel").await,
        0,
        "messages withdrawn"
    );
    // Cancelling again is refused, and nothing ever ran `b`.
    let (_, again) = orchestrator::operator::cancel(&pool, id, None)
        .await
        .unwrap()
        .unwrap();
    assert!(!again);
    assert_eq!(fleet::task_state(&pool, id).await, TaskState::Cancelled);
    assert_eq!(
        count(&pool, "select count(*) from weft.step_transitions t join weft.steps s on s.id = t.step_id where s.name = 'b' and t.to_state = 'enqueued'").await,
        0
    );
    shutdown.cancel();
    worker_task.await.unwrap().unwrap();
    orchestrator_task.await.unwrap().unwrap();
}

/// A handler over its step timeout is cancelled and the attempt fails
/// retryably with reason `timeout`.
#[tokio::test]
async fn timeouts_fail_the_attempt_retryably() {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "namespace: slow\nname: t\nversion: 1\ndefaults:\n  timeout: 200ms\n  retry: { max_attempts: 2, backoff: { initial: 10ms, max: 10ms } }\nsteps:\n  - { name: a, handler: builtin.sleep, config: { ms: 10000 } }\n",
    )
    .await;
    let fleet = Fleet::start(&pool, 1, &["slow"]);
    let started = Instant::now();
    let id = fleet::create(&pool, "slow", "t", json!({})).await;
    assert_eq!(fleet::wait_final(&pool, id, LONG).await, TaskState::Error);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the handler was not stopped at its timeout"
    );
    let a = fleet::step(&fleet::steps(&pool, id).await, "a").clone();
    assert_eq!(a.attempts, 2, "the timeout was retryable");
    assert_eq!(a.last_error.unwrap()["reason"], json!("timeout"));
    fleet.stop().await;
}

/// Retrying a failed step gives it fresh attempts; resolving one lets its
/// dependents run with the given output. Either moves a task in `error`
/// back to running, and it completes.
#[tokio::test]
async fn operator_retry_and_resolve_repair_a_task() {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "namespace: repair\nname: t\nversion: 1\ndefaults:\n  retry: { max_attempts: 1 }\nsteps:\n  - { name: a, handler: builtin.fail, config: { mode: permanent, times: 1 } }\n  - { name: b, handler: builtin.fail, config: { mode: permanent, times: 99 } }\n  - { name: c, handler: builtin.noop, depends_on: [a, b] }\n",
    )
    .await;
    let fleet = Fleet::start(&pool, 1, &["repair"]);
    let id = fleet::create(&pool, "repair", "t", json!({})).await;
    assert_eq!(fleet::wait_final(&pool, id, LONG).await, TaskState::Error);
    use orchestrator::operator::{Repair, repair};
    use orchestrator::store::ActionOutcome;
    assert_eq!(
        repair(&pool, id, "c", Repair::Retry).await.unwrap(),
        ActionOutcome::Refused("not_failed".into())
    );
    assert!(matches!(
        repair(&pool, id, "nope", Repair::Retry).await.unwrap(),
        ActionOutcome::NotFound(_)
    ));
    assert_eq!(
        repair(&pool, id, "a", Repair::Retry).await.unwrap(),
        ActionOutcome::Applied
    );
    let reopened = support::wait_until(LONG, || async {
        fleet::step(&fleet::steps(&pool, id).await, "a").state == StepState::Complete
    })
    .await;
    assert!(reopened, "the retried step ran again");
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Error,
        "b still blocks"
    );
    let output = json!({ "resolved_by": "operator" });
    assert_eq!(
        repair(
            &pool,
            id,
            "b",
            Repair::Resolve {
                output: Some(output.clone())
            }
        )
        .await
        .unwrap(),
        ActionOutcome::Applied
    );
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Complete
    );
    let steps = fleet::steps(&pool, id).await;
    assert_eq!(
        fleet::step(&steps, "a").attempts,
        1,
        "a fresh budget: one attempt of the new budget"
    );
    assert_eq!(
        fleet::step(&steps, "c").output.clone().unwrap()["dependencies"]["b"],
        output
    );
    let transitions: Vec<(Option<String>, String)> = sqlx::query_as(
        "select from_state, to_state from weft.task_transitions where task_id = $1 order by id",
    )
    .bind(id.0)
    .fetch_all(&pool)
    .await
    .unwrap();
    let to: Vec<&str> = transitions.iter().map(|t| t.1.as_str()).collect();
    assert_eq!(
        to,
        [
            "pending", "running", "error", "running", "error", "running", "complete"
        ]
    );
    fleet.stop().await;
    fleet::check_books(&pool).await;
}

/// `weft check` passes on a healthy database and fails, with a report,
/// on a stuck task.
#[tokio::test]
async fn weft_check_reports_violations() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 5).await;
    fleet::register(
        &pool,
        "namespace: chk\nname: t\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n",
    )
    .await;
    let fleet = Fleet::start(&pool, 1, &["chk"]);
    let id = fleet::create(&pool, "chk", "t", json!({})).await;
    fleet::wait_final(&pool, id, LONG).await;
    fleet.stop().await;
    let run = |url: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["check", "--grace", "0s"])
            .env("DATABASE_URL", url)
            .output()
            .await
            .unwrap()
    };
    let ok = run(url.clone()).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    // A task whose only step is pending but was never enqueued: stuck.
    let stuck = fleet::create(&pool, "chk", "t", json!({})).await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("delete from pgmq.q_weft_steps_chk")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("update weft.tasks set updated_at = now() - interval '1 hour' where id = $1")
        .bind(stuck.0)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let bad = run(url).await;
    let report = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success(), "{report}");
    assert!(
        report.contains("FAIL every enqueued step has its message"),
        "{report}"
    );
}

/// A lease commits without waiting for its WAL flush (losing one to a crash
/// only redelivers early); a completion, which deletes the step message and
/// sends the result, stays a durable commit.
#[tokio::test]
async fn a_lease_commits_asynchronously_and_a_completion_durably() {
    let pool = support::fresh_pool().await;
    let results = QueueName::results();
    let setting = "select current_setting('synchronous_commit')";
    queue::send_batch(&pool, &results, &[json!({"lease": 1})])
        .await
        .unwrap();

    // The session's own setting (a test cluster may run without durable commits).
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("set synchronous_commit = on")
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    let read = queue::read(&mut *tx, &results, 30, 10).await.unwrap();
    assert_eq!(read.len(), 1);
    let during_lease: String = sqlx::query_scalar(setting)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        during_lease, "off",
        "the lease's transaction commits asynchronously"
    );
    tx.commit().await.unwrap();

    sqlx::query("select weft.ensure_namespace('leases')")
        .execute(&pool)
        .await
        .unwrap();
    let steps = QueueName::steps(&Namespace::parse("leases").unwrap());
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    queue::complete(&mut *tx, &steps, &[], &results, &[json!({"done": 1})])
        .await
        .unwrap();
    let during_completion: String = sqlx::query_scalar(setting)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(during_completion, "on", "a completion is a durable commit");
    tx.rollback().await.unwrap();

    // Outside the lease's transaction the session keeps its own setting.
    let after: String = sqlx::query_scalar(setting)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(after, "on");
}

/// The collectors of one orchestrator share wake-ups: the lead takes what
/// arrives while it waits, and a helper takes what arrives while the lead is
/// mid-batch. Neither path waits for the fallback poll (an hour here): a
/// result for a task whose row the test holds locked keeps the lead busy,
/// and a result for another task is applied meanwhile, by the helper.
/// A collector's settings for tests that send results themselves: no
/// fallback poll within the test, so only notifications wake it.
fn notified_only() -> orchestrator::collector::CollectorConfig {
    let mut config = fleet::orchestrator_config().collector;
    config.poll_interval = Duration::from_secs(3600);
    config
}

/// Whether `n` connections of the database are listening, within 10 s (a
/// notification sent before LISTEN is not delivered).
async fn listening(pool: &sqlx::PgPool, n: i64) -> bool {
    support::wait_until(Duration::from_secs(10), || async {
        count(
            pool,
            "select count(*) from pg_stat_activity
              where datname = current_database() and query like 'LISTEN%'",
        )
        .await
            == n
    })
    .await
}

#[tokio::test]
async fn a_helper_collector_applies_results_while_the_lead_is_busy() {
    use orchestrator::collector::{Crew, Role};

    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(
        &pool,
        "namespace: crew\nname: one\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n",
    )
    .await;
    // No worker: the test sends each step's result itself.
    let blocked = fleet::create(&pool, "crew", "one", json!({})).await;
    let passing = fleet::create(&pool, "crew", "one", json!({})).await;
    let later = fleet::create(&pool, "crew", "one", json!({})).await;
    let success = |task| {
        let pool = pool.clone();
        async move {
            let step = fleet::step(&fleet::steps(&pool, task).await, "a").id;
            json!({ "v": 1, "task_id": task, "step_id": step, "attempt": 1, "status": "success", "output": {} })
        }
    };

    let config = notified_only();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let crew = Crew::default();
    let mut running = Vec::new();
    for role in [Role::Lead(crew.clone()), Role::Helper(crew)] {
        let collector = orchestrator::Collector::with_role(
            fleet::own_pool(&pool),
            config.clone(),
            orchestrator::Metrics::default(),
            role,
        );
        running.push(tokio::spawn(collector.run(shutdown.clone())));
    }
    // Both listening before any result is sent (the poll is an hour away).
    assert!(listening(&pool, 2).await, "both collectors listen");

    let mut lock = pool.begin().await.unwrap();
    sqlx::query("select 1 from weft.tasks where id = $1 for update")
        .bind(blocked)
        .execute(&mut *lock)
        .await
        .unwrap();
    queue::send_batch(&pool, &QueueName::results(), &[success(blocked).await])
        .await
        .unwrap();
    // The lead took it and now waits for the task's row lock.
    let lead_busy = support::wait_until(Duration::from_secs(10), || async {
        count(
            &pool,
            "select count(*) from pg_stat_activity
              where datname = current_database() and wait_event_type = 'Lock'
                and query like '%collect_batch%'",
        )
        .await
            == 1
    })
    .await;
    assert!(lead_busy, "the lead collector waits for the locked task");

    queue::send_batch(&pool, &QueueName::results(), &[success(passing).await])
        .await
        .unwrap();
    assert_eq!(
        fleet::wait_final(&pool, passing, Duration::from_secs(10)).await,
        TaskState::Complete,
        "the helper applied the result the busy lead could not take"
    );
    assert_eq!(fleet::task_state(&pool, blocked).await, TaskState::Running);

    lock.commit().await.unwrap();
    assert_eq!(
        fleet::wait_final(&pool, blocked, Duration::from_secs(10)).await,
        TaskState::Complete
    );
    // The lead waits again and takes the next result at once.
    queue::send_batch(&pool, &QueueName::results(), &[success(later).await])
        .await
        .unwrap();
    assert_eq!(
        fleet::wait_final(&pool, later, Duration::from_secs(10)).await,
        TaskState::Complete
    );
    shutdown.cancel();
    for r in running {
        r.await.unwrap();
    }
}

/// Workers name the results they send in their notification, and a
/// collector skips a wake-up for results its crew already applied, but acts
/// on one that names a result it has not taken and on one that names none.
#[tokio::test]
async fn a_notification_for_results_already_applied_starts_no_batch() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(
        &pool,
        "namespace: named\nname: one\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n",
    )
    .await;
    // No worker: the test sends each step's result itself.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(fleet::create(&pool, "named", "one", json!({})).await);
    }
    let mut results = Vec::new();
    let mut step_msgs = Vec::new();
    for task in &tasks {
        let step = fleet::step(&fleet::steps(&pool, *task).await, "a").id;
        results.push(json!({ "v": 1, "task_id": task, "step_id": step, "attempt": 1, "status": "success", "output": {} }));
        let msg_id: i64 = sqlx::query_scalar("select msg_id from weft.steps where id = $1")
            .bind(step)
            .fetch_one(&pool)
            .await
            .unwrap();
        step_msgs.push(msg_id);
    }

    let metrics = orchestrator::Metrics::default();
    let skipped = |metrics: &orchestrator::Metrics| {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("weft_collector_wakeups_skipped_total "))
            .map(|v| v.parse::<u64>().unwrap())
            .unwrap()
    };
    let collector =
        orchestrator::Collector::new(fleet::own_pool(&pool), notified_only(), metrics.clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(collector.run(shutdown.clone()));
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("weft_results").await.unwrap();
    assert!(
        listening(&pool, 2).await,
        "the collector and the test listen"
    );

    // A worker's completion names its result's message id.
    let steps_queue = QueueName::steps(&Namespace::parse("named").unwrap());
    queue::complete(
        &pool,
        &steps_queue,
        &step_msgs[..1],
        &QueueName::results(),
        &results[..1],
    )
    .await
    .unwrap();
    let payload = listener.recv().await.unwrap().payload().to_owned();
    let first_id: i64 = payload.parse().expect("one message id");
    assert_eq!(
        fleet::wait_final(&pool, tasks[0], Duration::from_secs(10)).await,
        TaskState::Complete
    );
    assert_eq!(skipped(&metrics), 0);

    // The same notification again: its result is applied, nothing to do.
    sqlx::query("select pg_notify('weft_results', $1)")
        .bind(&payload)
        .execute(&pool)
        .await
        .unwrap();
    let skips =
        support::wait_until(Duration::from_secs(10), || async { skipped(&metrics) == 1 }).await;
    assert!(skips, "the wake-up for an applied result was skipped");

    // A result sent without notifying, then a notification naming it and
    // the applied one: the collector acts on it.
    let second_id: i64 = sqlx::query_scalar(
        "insert into pgmq.q_weft_results (vt, message) values (clock_timestamp(), $1) returning msg_id",
    )
    .bind(&results[1])
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("select pg_notify('weft_results', $1)")
        .bind(format!("{first_id},{second_id}"))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        fleet::wait_final(&pool, tasks[1], Duration::from_secs(10)).await,
        TaskState::Complete
    );
    // A notification that names nothing (the protocol's plain wake-up) counts too.
    queue::send_batch(&pool, &QueueName::results(), &results[2..])
        .await
        .unwrap();
    assert_eq!(
        fleet::wait_final(&pool, tasks[2], Duration::from_secs(10)).await,
        TaskState::Complete
    );
    assert_eq!(skipped(&metrics), 1);
    shutdown.cancel();
    running.await.unwrap();
}

/// The lead collector's batch linger (`shared::linger`), with the test
/// sending each result in its own transaction as a worker would: results
/// that stream in are applied in one batch; a result that follows alone
/// waits the linger once, gathers nothing, and the next one goes at once.
#[tokio::test]
async fn a_collector_applies_a_stream_of_results_together_while_waiting_pays() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(
        &pool,
        "namespace: stream\nname: one\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n",
    )
    .await;
    // No worker: the test sends each step's result itself.
    let mut sends = Vec::new();
    for _ in 0..5 {
        let task = fleet::create(&pool, "stream", "one", json!({})).await;
        let step = fleet::step(&fleet::steps(&pool, task).await, "a").id;
        let msg_id: i64 = sqlx::query_scalar("select msg_id from weft.steps where id = $1")
            .bind(step)
            .fetch_one(&pool)
            .await
            .unwrap();
        let result = json!({ "v": 1, "task_id": task, "step_id": step, "attempt": 1, "status": "success", "output": {} });
        sends.push((task, msg_id, result));
    }
    let steps_queue = QueueName::steps(&Namespace::parse("stream").unwrap());
    // Sends one result as a worker's completion does, and returns when.
    let send = |i: usize| {
        let (pool, steps_queue, (_, msg_id, result)) = (&pool, &steps_queue, &sends[i]);
        async move {
            let sent: f64 =
                sqlx::query_scalar("select extract(epoch from clock_timestamp())::float8")
                    .fetch_one(pool)
                    .await
                    .unwrap();
            queue::complete(
                pool,
                steps_queue,
                &[*msg_id],
                &QueueName::results(),
                std::slice::from_ref(result),
            )
            .await
            .unwrap();
            sent
        }
    };
    // When a task's step completion was applied (epoch seconds).
    let applied = |i: usize| {
        let (pool, task) = (&pool, sends[i].0);
        async move {
            assert_eq!(
                fleet::wait_final(pool, task, Duration::from_secs(30)).await,
                TaskState::Complete
            );
            sqlx::query_scalar::<_, f64>(
                "select extract(epoch from at)::float8 from weft.step_transitions
                  where task_id = $1 and to_state = 'complete'",
            )
            .bind(task.0)
            .fetch_one(pool)
            .await
            .unwrap()
        }
    };

    let mut config = notified_only();
    config.linger = Duration::from_secs(2);
    let collector = orchestrator::Collector::new(
        fleet::own_pool(&pool),
        config,
        orchestrator::Metrics::default(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(collector.run(shutdown.clone()));
    // The collector listens once its first batch (of nothing) is over: the
    // results below follow it within the linger.
    assert!(listening(&pool, 1).await, "the collector listens");

    let first_sent = send(0).await;
    send(1).await;
    send(2).await;
    let together = [applied(0).await, applied(1).await, applied(2).await];
    assert!(
        together.iter().all(|at| *at == together[0]),
        "the three results were applied in one batch: {together:?}"
    );
    assert!(
        together[0] - first_sent >= 1.9,
        "the first waited the linger for the others: {} s",
        together[0] - first_sent
    );

    let alone_sent = send(3).await;
    let alone_took = applied(3).await - alone_sent;
    let next_sent = send(4).await;
    let next_took = applied(4).await - next_sent;
    shutdown.cancel();
    running.await.unwrap();
    assert!(
        alone_took >= 1.9,
        "waiting paid last time, so a lone result waits the linger: {alone_took} s"
    );
    assert!(
        next_took < 1.0,
        "that wait gathered nothing, so the next result goes at once: {next_took} s"
    );
}

/// An orchestrator listens on one connection (PostgreSQL wakes every
/// listening backend of a database on every NOTIFY, whatever the channel):
/// its hub hands each notification to the loops of that channel only, with
/// a burst's ids together, tells every loop when the connection drops
/// (notifications may be lost), and listens again after.
#[tokio::test]
async fn one_listener_wakes_each_loop_for_its_channels_and_survives_a_lost_connection() {
    use orchestrator::wake::{Hub, Wake, Woken};
    let pool = support::fresh_pool().await;
    let hub = Hub::new(
        pool.clone(),
        &[queue::RESULTS, orchestrator::scheduler::RETRIES],
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(hub.clone().run(stop.clone()));
    let mut results = Wake::shared(&hub, &[queue::RESULTS]);
    let mut retries = Wake::shared(&hub, &[orchestrator::scheduler::RETRIES]);
    let listeners = "select count(*) from pg_stat_activity
                      where datname = current_database() and query like 'LISTEN%'";
    let up = support::wait_until(Duration::from_secs(10), || async {
        hub.listening() && count(&pool, listeners).await == 1
    });
    assert!(up.await, "one LISTEN connection for both channels");
    let long = Duration::from_secs(10);

    let notify = |channel: &'static str, payload: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query("select pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    sqlx::query("select pg_notify($1, '3'), pg_notify($1, '5')")
        .bind(queue::RESULTS)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(results.wait(long).await, Woken::Notified);
    assert_eq!(
        results.named(),
        Some(&[3, 5][..]),
        "a burst wakes once, with all its ids"
    );
    notify(orchestrator::scheduler::RETRIES, "11").await;
    assert_eq!(retries.wait(long).await, Woken::Notified);
    assert_eq!(
        retries.named(),
        Some(&[11][..]),
        "the retries loop saw only its own channel"
    );
    notify(queue::RESULTS, "7").await;
    assert_eq!(results.wait(long).await, Woken::Notified);
    assert_eq!(
        results.named(),
        Some(&[7][..]),
        "the results loop saw nothing of the retries"
    );

    let killed = "select count(pg_terminate_backend(pid)) from pg_stat_activity
                   where datname = current_database() and query like 'LISTEN%'";
    assert_eq!(count(&pool, killed).await, 1);
    assert_eq!(results.wait(long).await, Woken::Reconnecting);
    assert_eq!(retries.wait(long).await, Woken::Reconnecting);
    // Listening again: a notification reaches the loop (one sent before the
    // new LISTEN took effect is lost, which is what the poll is for).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut heard = false;
    while !heard && Instant::now() < deadline {
        notify(queue::RESULTS, "9").await;
        heard = results.wait(Duration::from_millis(100)).await == Woken::Notified
            && results.named() == Some(&[9][..]);
    }
    assert!(heard, "the hub listens again after its connection dropped");
    stop.cancel();
    running.await.unwrap();
    assert!(!hub.listening());
}
