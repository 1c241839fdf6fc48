//! The database restarts under load, and the chaos run: thousands of mixed
//! tasks while a controller kills orchestrators and workers and restarts
//! PostgreSQL. Each test runs its own private cluster.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use shared::TaskState;

use crate::fleet::{self, Proc};
use crate::support::{self, Cluster};

const TEMPLATES: &[(&str, &str, TaskState)] = &[
    (
        "chain",
        "namespace: chaos\nname: chain\nversion: 1\nsteps:\n  - { name: a, handler: builtin.sleep, config: { ms: 5 } }\n  - { name: b, handler: builtin.noop, depends_on: [a] }\n  - { name: c, handler: builtin.noop, depends_on: [b] }\n",
        TaskState::Complete,
    ),
    (
        "diamond",
        "namespace: chaos\nname: diamond\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n  - { name: b, handler: builtin.sleep, config: { ms: 10 }, depends_on: [a] }\n  - { name: c, handler: builtin.noop, depends_on: [a] }\n  - { name: d, handler: builtin.noop, depends_on: [b, c] }\n",
        TaskState::Complete,
    ),
    (
        "fan",
        "namespace: chaos\nname: fan\nversion: 1\nsteps:\n  - { name: s, handler: builtin.noop }\n  - { name: w1, handler: builtin.noop, depends_on: [s] }\n  - { name: w2, handler: builtin.noop, depends_on: [s] }\n  - { name: w3, handler: builtin.noop, depends_on: [s] }\n  - { name: w4, handler: builtin.noop, depends_on: [s] }\n  - { name: w5, handler: builtin.noop, depends_on: [s] }\n  - { name: j, handler: builtin.noop, depends_on: [w1, w2, w3, w4, w5] }\n",
        TaskState::Complete,
    ),
    (
        "retrying",
        "namespace: chaos\nname: retrying\nversion: 1\ndefaults:\n  retry: { max_attempts: 4, backoff: { initial: 50ms, max: 200ms } }\nsteps:\n  - { name: a, handler: builtin.fail, config: { mode: retryable, times: 2 } }\n  - { name: b, handler: builtin.noop, depends_on: [a] }\n",
        TaskState::Complete,
    ),
    (
        "failing",
        "namespace: chaos\nname: failing\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n  - { name: b, handler: builtin.fail, config: { mode: permanent, times: 9 }, depends_on: [a] }\n  - { name: c, handler: builtin.noop, depends_on: [b] }\n",
        TaskState::Error,
    ),
];

async fn register_all(pool: &sqlx::PgPool) {
    for (_, yaml, _) in TEMPLATES {
        fleet::register(pool, yaml).await;
    }
}

/// Creates tasks `first..first + count` of the mix; returns each one's
/// expected final state.
async fn submit(pool: &sqlx::PgPool, first: usize, count: usize) -> HashMap<uuid::Uuid, TaskState> {
    let mut expected = HashMap::new();
    let mut requests = Vec::new();
    let mut kinds = Vec::new();
    for i in first..first + count {
        let (name, _, state) = TEMPLATES[i % TEMPLATES.len()];
        requests.push(orchestrator::tasks::CreateTask {
            namespace: "chaos".into(),
            name: name.into(),
            version: None,
            input: json!({ "i": i }),
            priority: 0,
            idempotency_key_hash: None,
            request_hash: None,
        });
        kinds.push(state);
    }
    // Same-template runs are grouped, so sort by template for bulk inserts.
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by_key(|i| requests[*i].name.clone());
    for chunk in order.chunks(250) {
        let batch: Vec<_> = chunk.iter().map(|i| requests[*i].clone()).collect();
        let created = orchestrator::tasks::create_tasks(pool, &Default::default(), &batch)
            .await
            .unwrap();
        for (i, c) in chunk.iter().zip(created) {
            expected.insert(c.id().0, kinds[*i]);
        }
    }
    expected
}

async fn assert_expected(pool: &sqlx::PgPool, expected: &HashMap<uuid::Uuid, TaskState>) {
    let rows: Vec<(uuid::Uuid, TaskState)> = sqlx::query_as("select id, state from weft.tasks")
        .fetch_all(pool)
        .await
        .unwrap();
    let wrong: Vec<_> = rows
        .iter()
        .filter(|(id, state)| expected.get(id) != Some(state))
        .take(10)
        .collect();
    assert_eq!(rows.len(), expected.len());
    assert!(
        wrong.is_empty(),
        "tasks in the wrong final state: {wrong:?}"
    );
    fleet::check_books(pool).await;
    let report = orchestrator::store::check_invariants(pool, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        report.iter().all(|c| c.violations == 0),
        "weft check: {report:#?}"
    );
}

async fn ready(port: u16) -> Option<u16> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/health/ready"))
        .await
        .ok()?;
    Some(response.status().as_u16())
}

/// PostgreSQL stops and comes back, then restarts in immediate mode, mid
/// load: readiness reports not-ready during the outage, every process
/// reconnects (LISTEN re-armed), and every task finishes correctly.
#[tokio::test]
async fn processes_survive_database_restarts() {
    let cluster = Cluster::start().await;
    let pool = support::pool(&cluster.url, 5).await;
    register_all(&pool).await;
    let orchestrator_port = fleet::free_port();
    let worker_port = fleet::free_port();
    let _orchestrator = Proc::spawn(
        &[
            "orchestrator",
            "--http-addr",
            &format!("127.0.0.1:{orchestrator_port}"),
        ],
        &cluster.url,
    );
    let _worker = Proc::spawn(
        &[
            "worker",
            "--namespace",
            "chaos",
            "--http-addr",
            &format!("127.0.0.1:{worker_port}"),
            "--lease",
            "2s",
        ],
        &cluster.url,
    );
    let up = support::wait_until(Duration::from_secs(30), || async {
        ready(orchestrator_port).await == Some(200) && ready(worker_port).await == Some(200)
    })
    .await;
    assert!(up, "processes never became ready");
    let expected = submit(&pool, 0, 300).await;

    cluster.stop();
    let down = support::wait_until(Duration::from_secs(30), || async {
        ready(orchestrator_port).await == Some(503) && ready(worker_port).await == Some(503)
    })
    .await;
    assert!(down, "readiness must fail while the database is down");
    cluster.start_again();
    let back = support::wait_until(Duration::from_secs(30), || async {
        ready(orchestrator_port).await == Some(200) && ready(worker_port).await == Some(200)
    })
    .await;
    assert!(back, "readiness must recover with the database");
    cluster.restart("immediate");
    let more = submit(&pool, 300, 100).await;
    fleet::wait_all_final(&pool, Duration::from_secs(120)).await;
    let mut all = expected;
    all.extend(more);
    assert_expected(&pool, &all).await;
}

/// 2,000 mixed tasks across 3 orchestrators and 4 workers while a controller
/// SIGKILLs a random process every second or two (and restarts it), and
/// restarts PostgreSQL once. The tasks arrive in five waves, one per kill, so
/// the chaos meets open work however fast the fleet drains it. Every task
/// ends in its expected state and `weft check` reports nothing.
#[tokio::test]
async fn chaos_run() {
    let cluster = Cluster::start().await;
    let pool = support::pool(&cluster.url, 5).await;
    register_all(&pool).await;
    let orchestrator = |url: &str| {
        Proc::spawn(
            &[
                "orchestrator",
                "--http-addr",
                &format!("127.0.0.1:{}", fleet::free_port()),
                "--result-lease",
                "2s",
            ],
            url,
        )
    };
    let worker = |url: &str| {
        Proc::spawn(
            &[
                "worker",
                "--namespace",
                "chaos",
                "--http-addr",
                &format!("127.0.0.1:{}", fleet::free_port()),
                "--lease",
                "2s",
            ],
            url,
        )
    };
    let mut procs: Vec<(bool, Proc)> = (0..3)
        .map(|_| (true, orchestrator(&cluster.url)))
        .chain((0..4).map(|_| (false, worker(&cluster.url))))
        .collect();
    const WAVES: usize = 5;
    const WAVE: usize = 400;
    let started = Instant::now();
    let mut expected = HashMap::new();
    let mut waves = 0;
    let mut kills = 0;
    let mut restarted_db = false;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if waves < WAVES {
            expected.extend(submit(&pool, waves * WAVE, WAVE).await);
            waves += 1;
            // The last wave is barely started: the restart meets open work.
            if waves == WAVES {
                cluster.restart("immediate");
                restarted_db = true;
            }
        }
        let open: i64 = sqlx::query_scalar(
            "select count(*) from weft.tasks where state in ('pending', 'running')",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(i64::MAX);
        if open == 0 && waves == WAVES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} tasks still open after the deadline"
        );
        let victim = rand::rng().random_range(0..procs.len());
        let (is_orchestrator, proc) = &procs[victim];
        proc.signal("KILL");
        let replacement = if *is_orchestrator {
            orchestrator(&cluster.url)
        } else {
            worker(&cluster.url)
        };
        procs[victim] = (*is_orchestrator, replacement);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1000..2000))).await;
    }
    let elapsed = started.elapsed();
    let longest: f64 = sqlx::query_scalar(
        "select coalesce(max(extract(epoch from done.at - enq.at)), 0)::float8
         from weft.step_transitions enq
         join weft.step_transitions done on done.step_id = enq.step_id and done.attempt = enq.attempt
                                       and done.from_state = 'enqueued'
         where enq.to_state = 'enqueued'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "chaos run: {} tasks in {:.1}s, {kills} kills survived, database restarted once, longest enqueue-to-result {longest:.2}s",
        WAVES * WAVE,
        elapsed.as_secs_f64()
    );
    assert!(restarted_db);
    assert!(
        kills >= 3,
        "the run was too short to kill anything ({kills} kills)"
    );
    assert_expected(&pool, &expected).await;
}
