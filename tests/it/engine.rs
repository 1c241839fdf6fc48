//! End to end: orchestrators and workers against one database, in-process
//! where the test is about the engine, as real processes where it is about
//! processes.

use std::time::{Duration, Instant};

use serde_json::json;
use shared::{StepState, TaskState};

use crate::fleet::{self, Fleet, Proc};
use crate::support;

const LONG: Duration = Duration::from_secs(60);

fn chain_yaml(n: usize) -> String {
    let mut yaml = String::from("namespace: e2e\nname: chain\nversion: 1\nsteps:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - name: s{i}\n    handler: builtin.noop\n    config: {{ index: {i} }}\n"
        ));
        if i > 0 {
            yaml.push_str(&format!("    depends_on: [s{}]\n", i - 1));
        }
    }
    yaml
}

const DIAMOND: &str = "
namespace: e2e
name: diamond
version: 1
steps:
  - { name: a, handler: builtin.noop }
  - { name: b, handler: builtin.noop, depends_on: [a] }
  - { name: c, handler: builtin.noop, depends_on: [a] }
  - { name: d, handler: builtin.noop, depends_on: [b, c] }
";

#[tokio::test]
async fn chain_of_ten_passes_outputs_along() {
    let pool = support::fresh_pool().await;
    fleet::register(&pool, &chain_yaml(10)).await;
    let fleet = Fleet::start(&pool, 1, &["e2e"]);
    let id = fleet::create(&pool, "e2e", "chain", json!({"order": 42})).await;
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Complete
    );
    let steps = fleet::steps(&pool, id).await;
    // builtin.noop returns its config, input and dependency outputs, so the
    // last output nests every earlier step's output.
    let last = fleet::step(&steps, "s9").output.clone().unwrap();
    assert_eq!(last["config"], json!({"index": 9}));
    assert_eq!(last["input"], json!({"order": 42}));
    assert_eq!(last["dependencies"]["s8"]["config"], json!({"index": 8}));
    assert_eq!(
        last["dependencies"]["s8"]["dependencies"]["s7"]["config"],
        json!({"index": 7})
    );
    fleet.stop().await;
    fleet::check_books(&pool).await;
}

#[tokio::test]
async fn diamond_joins_after_both_branches() {
    let pool = support::fresh_pool().await;
    fleet::register(&pool, DIAMOND).await;
    let fleet = Fleet::start(&pool, 2, &["e2e"]);
    let ids: Vec<_> = futures_util::future::join_all(
        (0..20).map(|i| fleet::create(&pool, "e2e", "diamond", json!({ "i": i }))),
    )
    .await;
    for id in ids {
        assert_eq!(
            fleet::wait_final(&pool, id, LONG).await,
            TaskState::Complete
        );
        let d = fleet::step(&fleet::steps(&pool, id).await, "d")
            .output
            .clone()
            .unwrap();
        assert_eq!(
            d["dependencies"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec!["b", "c"]
        );
    }
    fleet.stop().await;
    fleet::check_books(&pool).await;
}

#[tokio::test]
async fn fan_out_to_two_hundred_joins_once() {
    let pool = support::fresh_pool().await;
    let mut yaml = String::from(
        "namespace: e2e\nname: fan\nversion: 1\nsteps:\n  - { name: start, handler: builtin.noop }\n",
    );
    let mut wide = Vec::new();
    for i in 0..200 {
        yaml.push_str(&format!(
            "  - {{ name: w{i}, handler: builtin.noop, depends_on: [start] }}\n"
        ));
        wide.push(format!("w{i}"));
    }
    yaml.push_str(&format!(
        "  - {{ name: join, handler: builtin.noop, depends_on: [{}] }}\n",
        wide.join(", ")
    ));
    fleet::register(&pool, &yaml).await;
    let fleet = Fleet::start(&pool, 3, &["e2e"]);
    let id = fleet::create(&pool, "e2e", "fan", json!({})).await;
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Complete
    );
    let join_enqueued: i64 = sqlx::query_scalar(
        "select count(*) from weft.step_transitions t join weft.steps s on s.id = t.step_id
         where s.task_id = $1 and s.name = 'join' and t.to_state = 'enqueued'",
    )
    .bind(id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(join_enqueued, 1, "the join is enqueued exactly once");
    let join = fleet::step(&fleet::steps(&pool, id).await, "join")
        .output
        .clone()
        .unwrap();
    assert_eq!(join["dependencies"].as_object().unwrap().len(), 200);
    fleet.stop().await;
    fleet::check_books(&pool).await;
}

const RETRIES: &str = "
namespace: e2e
name: retries
version: 1
on_failure: continue
defaults:
  retry: { max_attempts: 3, backoff: { initial: 10ms, max: 50ms } }
steps:
  - { name: flaky, handler: builtin.fail, config: { mode: retryable, times: 2 } }
  - { name: exhausted, handler: builtin.fail, config: { mode: retryable, times: 5 } }
  - { name: broken, handler: builtin.fail, config: { mode: permanent, times: 1 } }
  - { name: after_flaky, handler: builtin.noop, depends_on: [flaky] }
  - { name: unknown, handler: nobody.home }
";

#[tokio::test]
async fn retries_exhaustion_and_permanent_failures() {
    let pool = support::fresh_pool().await;
    fleet::register(&pool, RETRIES).await;
    let fleet = Fleet::start(&pool, 1, &["e2e"]);
    let id = fleet::create(&pool, "e2e", "retries", json!({})).await;
    assert_eq!(fleet::wait_final(&pool, id, LONG).await, TaskState::Error);
    let steps = fleet::steps(&pool, id).await;
    let flaky = fleet::step(&steps, "flaky");
    assert_eq!(
        (flaky.state, flaky.attempts),
        (StepState::Complete, 3),
        "retry then success"
    );
    assert_eq!(
        fleet::step(&steps, "after_flaky").state,
        StepState::Complete,
        "continue runs independent branches"
    );
    let exhausted = fleet::step(&steps, "exhausted");
    assert_eq!(
        (exhausted.state, exhausted.attempts),
        (StepState::Error, 3),
        "retries exhausted"
    );
    assert_eq!(
        exhausted.last_error.as_ref().unwrap()["retries_exhausted"],
        json!(true)
    );
    let broken = fleet::step(&steps, "broken");
    assert_eq!(
        (broken.state, broken.attempts),
        (StepState::Error, 1),
        "permanent failure is not retried"
    );
    let unknown = fleet::step(&steps, "unknown");
    assert_eq!(unknown.state, StepState::Error);
    assert_eq!(
        unknown.last_error.as_ref().unwrap()["reason"],
        json!("unknown_handler")
    );
    fleet.stop().await;
    fleet::check_books(&pool).await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "
namespace: e2e
name: later
version: 1
defaults:
  retry: { max_attempts: 2, backoff: { initial: 1ms, max: 1ms } }
steps:
  - { name: slow_down, handler: builtin.fail, config: { mode: retryable, times: 1, retry_after_ms: 400 } }
",
    )
    .await;
    let fleet = Fleet::start(&pool, 1, &["e2e"]);
    let id = fleet::create(&pool, "e2e", "later", json!({})).await;
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Complete
    );
    let gap: f64 = sqlx::query_scalar(
        "select extract(epoch from max(at) filter (where attempt = 2 and to_state = 'enqueued')
                                 - max(at) filter (where attempt = 1 and to_state = 'waiting_retry'))::float8
         from weft.step_transitions where task_id = $1",
    )
    .bind(id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        gap >= 0.4,
        "the second attempt was enqueued {gap:.3}s after the failure, before retry_after"
    );
    assert!(
        gap < 5.0,
        "the retry was enqueued promptly, not after a coarse poll ({gap:.3}s)"
    );
    fleet.stop().await;
}

const SEED: &str = "
namespace: seed
name: seed
version: 1
defaults:
  retry: { max_attempts: 5, backoff: { initial: 20ms, max: 20ms, jitter: none } }
steps:
  - { name: ok, handler: builtin.noop }
  - { name: broken, handler: builtin.fail, config: { mode: permanent, times: 100 } }
  - { name: flaky, handler: builtin.fail, config: { mode: retryable, times: 100 } }
";

/// The lesson Weft is built on: one step fails permanently while a sibling
/// fails retryably with a short backoff and a third succeeds. Once the
/// permanent failure is recorded the task is blocked: nothing of it is
/// enqueued again, and it ends in `error`. Fifty times in a row, with three
/// orchestrator and three worker processes competing.
#[tokio::test]
async fn seed_scenario_fifty_times_across_processes() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(&pool, SEED).await;
    let _procs: Vec<Proc> = (0..3)
        .map(|_| Proc::orchestrator(&url))
        .chain((0..3).map(|_| Proc::worker(&url, "seed", &[])))
        .collect();
    for round in 0..50 {
        let id = fleet::create(&pool, "seed", "seed", json!({ "round": round })).await;
        assert_eq!(
            fleet::wait_final(&pool, id, LONG).await,
            TaskState::Error,
            "round {round}"
        );
        let steps = fleet::steps(&pool, id).await;
        assert_eq!(fleet::step(&steps, "ok").state, StepState::Complete);
        assert_eq!(fleet::step(&steps, "broken").state, StepState::Error);
        // After the permanent failure was recorded, nothing was enqueued.
        let late: i64 = sqlx::query_scalar(
            "select count(*) from weft.step_transitions t
             where t.task_id = $1 and t.to_state = 'enqueued'
               and t.at >= (select f.at from weft.step_transitions f join weft.steps s on s.id = f.step_id
                            where s.task_id = $1 and s.name = 'broken' and f.to_state = 'error')",
        )
        .bind(id.0)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            late, 0,
            "round {round}: a step was enqueued after the task was blocked"
        );
        let status: String =
            sqlx::query_scalar("select execution_status from weft.task_execution_context($1)")
                .bind(vec![id.0])
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(status, "blocked_by_failures", "round {round}");
    }
    fleet::check_books(&pool).await;
}

/// 500 diamonds across three orchestrator and three worker processes.
#[tokio::test]
async fn five_hundred_diamonds_across_processes() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(&pool, DIAMOND).await;
    let _procs: Vec<Proc> = (0..3)
        .map(|_| Proc::orchestrator(&url))
        .chain((0..3).map(|_| Proc::worker(&url, "e2e", &[])))
        .collect();
    let started = Instant::now();
    let requests: Vec<_> = (0..500)
        .map(|i| orchestrator::tasks::CreateTask {
            namespace: "e2e".into(),
            name: "diamond".into(),
            version: None,
            input: json!({ "i": i }),
            priority: 0,
            idempotency_key_hash: None,
            request_hash: None,
        })
        .collect();
    for chunk in requests.chunks(50) {
        orchestrator::tasks::create_tasks(&pool, &Default::default(), chunk)
            .await
            .unwrap();
    }
    fleet::wait_all_final(&pool, Duration::from_secs(120)).await;
    println!("500 diamonds in {:.2}s", started.elapsed().as_secs_f64());
    let complete: i64 =
        sqlx::query_scalar("select count(*) from weft.tasks where state = 'complete'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(complete, 500);
    let joins: i64 = sqlx::query_scalar(
        "select count(*) from weft.step_transitions t join weft.steps s on s.id = t.step_id
         where s.name = 'd' and t.to_state = 'enqueued'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(joins, 500, "every join enqueued exactly once");
    fleet::check_books(&pool).await;
}

/// SIGTERM a worker under load: it stops reading, finishes what it holds,
/// exits 0, and nothing is lost.
#[tokio::test]
async fn worker_sigterm_drain_loses_nothing() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 10).await;
    fleet::register(
        &pool,
        "
namespace: drain
name: slow
version: 1
steps:
  - { name: a, handler: builtin.sleep, config: { ms: 300 } }
  - { name: b, handler: builtin.sleep, config: { ms: 300 }, depends_on: [a] }
",
    )
    .await;
    let _orchestrator = Proc::orchestrator(&url);
    let mut leaving = Proc::worker(
        &url,
        "drain",
        &["--concurrency", "8", "--drain-deadline", "10s"],
    );
    let _staying = Proc::worker(&url, "drain", &["--concurrency", "8"]);
    let requests: Vec<_> = (0..60)
        .map(|i| orchestrator::tasks::CreateTask {
            namespace: "drain".into(),
            name: "slow".into(),
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
    // Wait until the leaving worker certainly holds work, then ask it to stop.
    let busy = support::wait_until(LONG, || async {
        let in_flight: i64 = sqlx::query_scalar(
            "select in_flight from weft.queue_stats() where queue_name = 'weft_steps_drain'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        in_flight >= 12
    })
    .await;
    assert!(busy, "workers never got busy");
    leaving.signal("TERM");
    let status = leaving.wait(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "the draining worker exits 0, got {status}"
    );
    fleet::wait_all_final(&pool, LONG).await;
    let complete: i64 =
        sqlx::query_scalar("select count(*) from weft.tasks where state = 'complete'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(complete, 60);
    fleet::check_books(&pool).await;
}

/// Results of handlers dispatched together wait for each other, up to the
/// worker's completion linger, and commit in one transaction: the
/// orchestrator applies a diamond's two branches in one batch. A sibling
/// still running when the linger ends is not waited for.
#[tokio::test]
async fn sibling_results_commit_together_within_the_linger() {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "
namespace: linger
name: fork
version: 1
steps:
  - { name: a, handler: builtin.noop }
  - { name: b, handler: builtin.noop, depends_on: [a] }
  - { name: c, handler: builtin.noop, depends_on: [a] }
  - { name: slow, handler: builtin.sleep, config: { ms: 4000 }, depends_on: [a] }
  - { name: d, handler: builtin.noop, depends_on: [b, c] }
",
    )
    .await;
    let mut worker = fleet::worker_config("linger");
    worker.completion_linger = Duration::from_secs(2);
    // One collector: results committed together are then always applied in
    // one batch (two collectors may split them, each locking one row).
    let mut orchestrator = fleet::orchestrator_config();
    orchestrator.collectors = 1;
    let fleet = Fleet::start_with(&pool, vec![orchestrator], vec![worker]);
    let id = fleet::create(&pool, "linger", "fork", json!({})).await;
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Complete
    );
    fleet.stop().await;
    // Seconds from b's enqueueing to each step's completion, as applied.
    let done: std::collections::HashMap<String, f64> = sqlx::query_as::<_, (String, f64)>(
        "select s.name,
                extract(epoch from t.at - (select e.at from weft.step_transitions e
                                            join weft.steps sb on sb.id = e.step_id
                                           where sb.task_id = $1 and sb.name = 'b'
                                             and e.to_state = 'enqueued'))::float8
           from weft.step_transitions t join weft.steps s on s.id = t.step_id
          where t.task_id = $1 and t.to_state = 'complete'",
    )
    .bind(id.0)
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(
        done["b"], done["c"],
        "b and c applied in one batch: {done:?}"
    );
    assert!(
        done["b"] >= 1.9,
        "b waited for its running sibling, up to the linger: {done:?}"
    );
    assert!(
        done["slow"] - done["b"] >= 1.0,
        "b and c did not wait for slow beyond the linger: {done:?}"
    );
}

/// A fresh database with the one-step template `one` in `namespace`.
async fn one_step_template(namespace: &str) -> sqlx::PgPool {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        &format!("namespace: {namespace}\nname: one\nversion: 1\nsteps:\n  - {{ name: a, handler: builtin.noop }}\n"),
    )
    .await;
    pool
}

/// Seconds from the task's step being enqueued to its completion being
/// applied, and the instant (epoch seconds) it was applied.
async fn step_timing(pool: &sqlx::PgPool, id: shared::TaskId) -> (f64, f64) {
    sqlx::query_as(
        "select extract(epoch from c.at - e.at)::float8, extract(epoch from c.at)::float8
           from weft.step_transitions c
           join weft.step_transitions e on e.step_id = c.step_id and e.to_state = 'enqueued'
          where c.task_id = $1 and c.to_state = 'complete'",
    )
    .bind(id.0)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The reader's batch linger (`shared::linger`): the steps of tasks created
/// one after another, moments after a read, are taken by one read that
/// waited the linger for them.
#[tokio::test]
async fn a_worker_reads_a_stream_of_steps_together() {
    let pool = one_step_template("reads").await;
    let mut worker = fleet::worker_config("reads");
    worker.read_linger = Duration::from_secs(2);
    worker.batch_linger = Duration::ZERO;
    worker.completion_linger = Duration::ZERO;
    let fleet = Fleet::start_with(&pool, vec![fleet::orchestrator_config()], vec![worker]);
    // The reader's first read (of nothing) is over once it listens: the
    // steps below follow it within the linger.
    let listening = support::wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_stat_activity where query like 'LISTEN%weft_steps_reads%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    assert!(listening, "the reader listens");
    let tasks = [
        fleet::create(&pool, "reads", "one", json!({})).await,
        fleet::create(&pool, "reads", "one", json!({})).await,
        fleet::create(&pool, "reads", "one", json!({})).await,
    ];
    for id in tasks {
        assert_eq!(
            fleet::wait_final(&pool, id, LONG).await,
            TaskState::Complete
        );
    }
    fleet.stop().await;
    let mut waited = Vec::new();
    for id in tasks {
        waited.push(step_timing(&pool, id).await.0);
    }
    // Read apart, the second and third would have been read (and applied)
    // at once, before the first's linger ended.
    assert!(
        waited.iter().all(|w| *w >= 1.5),
        "the three steps were read together, once the first's linger was over: {waited:?}"
    );
}

/// A read never waits for more steps than its free slots can take: a
/// worker with one slot reads a stream of steps one at a time, at once.
#[tokio::test]
async fn a_worker_with_one_slot_reads_a_stream_without_waiting() {
    let pool = one_step_template("single").await;
    let mut worker = fleet::worker_config("single");
    worker.concurrency = 1;
    worker.read_linger = Duration::from_secs(2);
    worker.batch_linger = Duration::ZERO;
    let fleet = Fleet::start_with(&pool, vec![fleet::orchestrator_config()], vec![worker]);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(fleet::create(&pool, "single", "one", json!({})).await);
    }
    let mut waited = Vec::new();
    for id in tasks {
        assert_eq!(
            fleet::wait_final(&pool, id, LONG).await,
            TaskState::Complete
        );
        waited.push(step_timing(&pool, id).await.0);
    }
    fleet.stop().await;
    assert!(
        waited.iter().all(|w| *w < 1.0),
        "no read waited the linger: {waited:?}"
    );
}

/// The worker's batch linger (`shared::linger`; the collector's does not
/// act here): results of tasks created together are committed in one
/// transaction; a result that follows alone waits the linger once, gathers
/// nothing, and the next one goes at once.
#[tokio::test]
async fn a_worker_commits_a_stream_of_results_together_while_waiting_pays() {
    let pool = one_step_template("stream").await;
    let mut worker = fleet::worker_config("stream");
    worker.completion_linger = Duration::ZERO;
    worker.read_linger = Duration::ZERO;
    worker.batch_linger = Duration::from_secs(2);
    // One collector that applies each notification's results at once, so
    // results committed together are applied together.
    let mut orchestrator = fleet::orchestrator_config();
    orchestrator.collectors = 1;
    orchestrator.collector.linger = Duration::ZERO;
    let fleet = Fleet::start_with(&pool, vec![orchestrator], vec![worker]);
    let create = || fleet::create(&pool, "stream", "one", json!({}));
    let done = |id| fleet::wait_final(&pool, id, LONG);

    // The completer's first batch has no quiet spell to judge: it goes at once.
    let first = create().await;
    assert_eq!(done(first).await, TaskState::Complete);
    let together = [create().await, create().await, create().await];
    for id in together {
        assert_eq!(done(id).await, TaskState::Complete);
    }
    let mut applied = Vec::new();
    for id in together {
        applied.push(step_timing(&pool, id).await);
    }
    assert!(
        applied.iter().all(|(_, at)| *at == applied[0].1),
        "the three results were committed, so applied, together: {applied:?}"
    );
    assert!(
        applied[0].0 >= 1.9,
        "the first waited the linger for the others: {applied:?}"
    );

    let alone = create().await;
    assert_eq!(done(alone).await, TaskState::Complete);
    let next = create().await;
    assert_eq!(done(next).await, TaskState::Complete);
    let (alone_took, _) = step_timing(&pool, alone).await;
    let (next_took, _) = step_timing(&pool, next).await;
    fleet.stop().await;
    assert!(
        alone_took >= 1.9,
        "waiting paid last time, so a lone result waits the linger: {alone_took} s"
    );
    assert!(
        next_took < 1.0,
        "that wait gathered nothing, so the next result goes at once: {next_took} s"
    );
}
