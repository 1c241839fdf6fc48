//! Operations: metrics on both binaries, retention, and horizontal scaling
//! with real worker processes, including a simulation of KEDA's loop.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;
use shared::TaskState;

use crate::fleet::{self, Fleet, Proc};
use crate::support;

const LONG: Duration = Duration::from_secs(60);

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// `/metrics` of the orchestrator carries queue gauges, task outcomes and
/// pool use; the worker's carries step outcome and hop latency histograms.
#[tokio::test]
async fn metrics_cover_queues_steps_and_hops() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 5).await;
    fleet::register(&pool, "namespace: obs\nname: t\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n  - { name: b, handler: builtin.noop, depends_on: [a] }\n").await;
    let orchestrator_port = fleet::free_port();
    let worker_port = fleet::free_port();
    let _o = Proc::spawn(
        &[
            "orchestrator",
            "--http-addr",
            &format!("127.0.0.1:{orchestrator_port}"),
            "--metrics-interval",
            "200ms",
        ],
        &url,
    );
    let _w = Proc::spawn(
        &[
            "worker",
            "--namespace",
            "obs",
            "--http-addr",
            &format!("127.0.0.1:{worker_port}"),
        ],
        &url,
    );
    let id = fleet::create(&pool, "obs", "t", json!({})).await;
    assert_eq!(
        fleet::wait_final(&pool, id, LONG).await,
        TaskState::Complete
    );
    let scrape = |port: u16| async move {
        match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    };
    let orchestrator_ok = support::wait_until(LONG, || async {
        let text = scrape(orchestrator_port).await;
        text.contains("weft_queue_depth{queue=\"weft_steps_obs\"} 0")
            && text.contains("weft_tasks_finished_total{state=\"complete\"} 1")
    })
    .await;
    let text = scrape(orchestrator_port).await;
    assert!(orchestrator_ok, "{text}");
    for needle in [
        "weft_queue_oldest_message_age_seconds{queue=\"weft_results\"}",
        "weft_queue_in_flight{queue=\"weft_steps_obs\"}",
        "weft_stale_results_dropped_total 0",
        "weft_db_pool_connections{state=\"max\"}",
    ] {
        assert!(
            text.contains(needle),
            "orchestrator metrics lack {needle}:\n{text}"
        );
    }
    let text = scrape(worker_port).await;
    for needle in [
        "weft_step_duration_seconds_count{namespace=\"obs\",handler=\"builtin.noop\",status=\"success\"} 2",
        "weft_hop_latency_seconds_count{namespace=\"obs\"} 2",
        "weft_worker_slots{state=\"total\"} 16",
        "weft_worker_results_total{status=\"success\"} 2",
    ] {
        assert!(
            text.contains(needle),
            "worker metrics lack {needle}:\n{text}"
        );
    }
}

/// Pruning deletes finished tasks older than the cut-off with their steps
/// and history, in batches, and never touches running or recent tasks.
#[tokio::test]
async fn pruning_never_touches_running_tasks() {
    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "namespace: old\nname: quick\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n",
    )
    .await;
    fleet::register(&pool, "namespace: old\nname: slow\nversion: 1\nsteps:\n  - { name: a, handler: builtin.sleep, config: { ms: 60000 } }\n").await;
    let fleet = Fleet::start(&pool, 1, &["old"]);
    let mut finished = Vec::new();
    for _ in 0..7 {
        finished.push(fleet::create(&pool, "old", "quick", json!({})).await);
    }
    for id in &finished {
        fleet::wait_final(&pool, *id, LONG).await;
    }
    let running = fleet::create(&pool, "old", "slow", json!({})).await;
    let recent = fleet::create(&pool, "old", "quick", json!({})).await;
    fleet::wait_final(&pool, recent, LONG).await;
    // Age the first seven by two hours; the running task is old too.
    sqlx::query("update weft.tasks set finished_at = finished_at - interval '2 hours', created_at = created_at - interval '2 hours' where id = any($1)")
        .bind(finished.iter().map(|t| t.0).collect::<Vec<_>>())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("update weft.tasks set created_at = created_at - interval '3 hours' where id = $1")
        .bind(running.0)
        .execute(&pool)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let pruned = orchestrator::pruner::prune(&pool, Duration::from_secs(3600), 3, &stop)
        .await
        .unwrap();
    assert_eq!(pruned.tasks, 7, "three batches of at most three");
    let left: Vec<uuid::Uuid> = sqlx::query_scalar("select id from weft.tasks order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut expected = vec![running.0, recent.0];
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(fleet::task_state(&pool, running).await, TaskState::Running);
    assert_eq!(
        count(&pool, "select count(*) from weft.step_transitions t where not exists (select 1 from weft.tasks where id = t.task_id)").await,
        0,
        "history went with its tasks"
    );
    fleet.stop().await;
}

/// Steps completed per second over a window.
async fn throughput(pool: &sqlx::PgPool, window: Duration) -> f64 {
    let before = count(
        pool,
        "select count(*) from weft.steps where state = 'complete'",
    )
    .await;
    tokio::time::sleep(window).await;
    let after = count(
        pool,
        "select count(*) from weft.steps where state = 'complete'",
    )
    .await;
    (after - before) as f64 / window.as_secs_f64()
}

const SCALE_TEMPLATE: &str = "namespace: scale\nname: io\nversion: 1\nsteps:\n  - { name: a, handler: builtin.sleep, config: { ms: 50 } }\n";

async fn enqueue_io_tasks(pool: &sqlx::PgPool, n: usize) {
    let requests: Vec<_> = (0..n)
        .map(|i| orchestrator::tasks::CreateTask {
            namespace: "scale".into(),
            name: "io".into(),
            version: None,
            input: json!({ "i": i }),
            priority: 0,
            idempotency_key_hash: None,
            request_hash: None,
        })
        .collect();
    for chunk in requests.chunks(500) {
        orchestrator::tasks::create_tasks(pool, &Default::default(), chunk)
            .await
            .unwrap();
    }
}

/// One worker with a deep queue, then workers added one by one up to four
/// while the load runs, then removed with SIGTERM: throughput rises with the
/// workers, nothing is lost, nothing runs twice into the books, the queue drains.
#[tokio::test]
async fn throughput_scales_with_workers() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 5).await;
    fleet::register(&pool, SCALE_TEMPLATE).await;
    enqueue_io_tasks(&pool, 3000).await;
    let _orchestrator = Proc::orchestrator(&url);
    // Each worker has 4 slots for a 50 ms handler: at most ~80 steps/s each,
    // so the machine does not saturate before four workers.
    let mut workers = Vec::new();
    let mut figures = Vec::new();
    for n in 1..=4 {
        workers.push(Proc::worker(&url, "scale", &["--concurrency", "4"]));
        tokio::time::sleep(Duration::from_millis(500)).await; // let the new worker start reading
        let rate = throughput(&pool, Duration::from_secs(3)).await;
        println!("{n} worker(s): {rate:.0} steps/s");
        figures.push(rate);
    }
    for mut w in workers.drain(..).rev() {
        w.signal("TERM");
        let status = w.wait(Duration::from_secs(30)).await;
        assert!(status.success(), "a draining worker exits 0");
        if count(
            &pool,
            "select count(*) from weft.tasks where state <> 'complete'",
        )
        .await
            == 0
        {
            break;
        }
    }
    // Whatever is left is finished by a fresh worker.
    let _last = Proc::worker(&url, "scale", &["--concurrency", "16"]);
    fleet::wait_all_final(&pool, Duration::from_secs(120)).await;
    assert_eq!(
        count(
            &pool,
            "select count(*) from weft.tasks where state = 'complete'"
        )
        .await,
        3000
    );
    assert_eq!(
        count(
            &pool,
            "select depth + in_flight from weft.queue_stats() where queue_name = 'weft_steps_scale'"
        )
        .await,
        0
    );
    fleet::check_books(&pool).await;
    assert!(
        figures[1] > figures[0] * 1.4,
        "two workers beat one: {figures:?}"
    );
    assert!(
        figures[3] > figures[0] * 2.0,
        "four workers beat one: {figures:?}"
    );
}

/// KEDA's loop, simulated: read the documented depth query at an interval,
/// set the worker count to ceil(depth / target) within [min, max], start or
/// SIGTERM worker processes to match, while the load ramps up and down. The
/// fleet follows the load and drains it. The timeline is written as CSV
/// (`target/keda-simulation.csv`; `scripts/plot-keda` turns it into the PNG
/// in docs/).
#[tokio::test]
async fn keda_loop_follows_a_load_ramp() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 5).await;
    fleet::register(&pool, SCALE_TEMPLATE).await;
    let _orchestrator = Proc::orchestrator(&url);
    let (target, min, max) = (40_i64, 0_usize, 4_usize);
    let mut workers: Vec<Proc> = Vec::new();
    let mut csv = String::from("seconds,submitted_per_tick,depth,workers,completed_total\n");
    let started = Instant::now();
    let mut peak_workers = 0;
    // Ticks of 500 ms: load ramps up, holds, ramps down to nothing.
    let load: Vec<usize> = (0..10)
        .map(|i| i * 15)
        .chain([150; 8])
        .chain((0..10).rev().map(|i| i * 15))
        .chain([0; 24])
        .collect();
    for per_tick in load {
        if per_tick > 0 {
            enqueue_io_tasks(&pool, per_tick).await;
        }
        // The documented KEDA query (docs/operations.md): work outstanding.
        let depth = count(
            &pool,
            "select depth + in_flight from weft.queue_stats() where queue_name = 'weft_steps_scale'",
        )
        .await;
        // KEDA's formula for a query trigger: desired = ceil(metric / target).
        let desired = (((depth + target - 1) / target) as usize).clamp(min, max);
        while workers.len() < desired {
            workers.push(Proc::worker(&url, "scale", &["--concurrency", "4"]));
        }
        while workers.len() > desired {
            if let Some(w) = workers.pop() {
                w.signal("TERM"); // drains in the background; its steps finish or return to the queue
                drop_after_exit(w);
            }
        }
        peak_workers = peak_workers.max(workers.len());
        let completed = count(
            &pool,
            "select count(*) from weft.tasks where state = 'complete'",
        )
        .await;
        csv.push_str(&format!(
            "{:.1},{per_tick},{depth},{},{completed}\n",
            started.elapsed().as_secs_f64(),
            workers.len()
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The tail: keep one worker until the queue is empty, as KEDA's minimum would.
    if workers.is_empty() {
        workers.push(Proc::worker(&url, "scale", &["--concurrency", "4"]));
    }
    fleet::wait_all_final(&pool, Duration::from_secs(120)).await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/keda-simulation.csv");
    if let Ok(mut file) = std::fs::File::create(path) {
        let _ = file.write_all(csv.as_bytes());
    }
    assert!(
        peak_workers >= 3,
        "the fleet scaled up under load: peak {peak_workers}\n{csv}"
    );
    let last_rows: Vec<&str> = csv.lines().rev().take(6).collect();
    assert!(
        last_rows.iter().all(|r| r.split(',').nth(3) == Some("0")),
        "the fleet scaled back to zero once the queue was empty:\n{csv}"
    );
    fleet::check_books(&pool).await;
}

/// Lets a SIGTERMed worker finish draining in the background.
fn drop_after_exit(mut worker: Proc) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(30), worker.child.wait()).await;
    });
}
