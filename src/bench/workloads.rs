//! W1 to W7 (see `docs/benchmarks.md` for what each figure measures).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::fleet::{Fleet, Instrument, create_batch, register};
use super::procs::{Launcher, cpu_ticks, ticks_per_second};
use super::server::{Server, connect};
use super::{Measured, Sizes};

/// The namespace of every benchmark template.
pub const NAMESPACE: &str = "bench";

/// What every workload needs.
pub struct Ctx<'a> {
    pub server: &'a Server,
    pub launcher: &'a Launcher,
    pub keep: bool,
    pub sizes: &'a Sizes,
}

impl Ctx<'_> {
    async fn fleet(
        &self,
        suffix: &str,
        templates: &[Value],
        workers: usize,
        instrument: Instrument,
    ) -> anyhow::Result<Fleet<'_>> {
        Fleet::start(
            self.server,
            self.launcher,
            self.keep,
            suffix,
            templates,
            workers,
            instrument,
        )
        .await
    }
}

fn step(name: &str, handler: &str, depends_on: &[&str]) -> Value {
    json!({ "name": name, "handler": handler, "depends_on": depends_on })
}

fn template(name: &str, steps: Vec<Value>) -> Value {
    json!({ "namespace": NAMESPACE, "name": name, "version": 1, "steps": steps })
}

/// One `builtin.noop` step.
pub fn one() -> Value {
    template("one", vec![step("a", "builtin.noop", &[])])
}

/// `n` `builtin.noop` steps in a line.
pub fn chain(n: usize) -> Value {
    let names: Vec<String> = (1..=n).map(|i| format!("s{i:02}")).collect();
    let steps = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let deps: Vec<&str> = if i == 0 {
                vec![]
            } else {
                vec![names[i - 1].as_str()]
            };
            step(name, "builtin.noop", &deps)
        })
        .collect();
    template("chain", steps)
}

/// A, then B and C in parallel, then D.
pub fn diamond() -> Value {
    template(
        "diamond",
        vec![
            step("a", "builtin.noop", &[]),
            step("b", "builtin.noop", &["a"]),
            step("c", "builtin.noop", &["a"]),
            step("d", "builtin.noop", &["b", "c"]),
        ],
    )
}

/// One root, `width` parallel steps, one join.
pub fn fan(width: usize) -> Value {
    let wide: Vec<String> = (0..width).map(|i| format!("w{i:04}")).collect();
    let mut steps = vec![step("root", "builtin.noop", &[])];
    steps.extend(wide.iter().map(|w| step(w, "builtin.noop", &["root"])));
    let refs: Vec<&str> = wide.iter().map(String::as_str).collect();
    steps.push(step("join", "builtin.noop", &refs));
    template("fan", steps)
}

/// W5's 5-step DAG: a → (b, c) → d → e.
pub fn dag5() -> Value {
    template(
        "dag5",
        vec![
            step("a", "builtin.noop", &[]),
            step("b", "builtin.noop", &["a"]),
            step("c", "builtin.noop", &["a"]),
            step("d", "builtin.noop", &["b", "c"]),
            step("e", "builtin.noop", &["d"]),
        ],
    )
}

/// One step failing retryably twice, then succeeding; backoff from 100 ms, full jitter.
pub fn flaky() -> Value {
    template(
        "flaky",
        vec![json!({
            "name": "flaky",
            "handler": "builtin.fail",
            "config": { "mode": "retryable", "times": 2 },
            "retry": {
                "max_attempts": 5,
                "backoff": { "initial": "100ms", "max": "10s", "multiplier": 2.0, "jitter": "full" }
            }
        })],
    )
}

fn secs_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A generous bound for `n` tasks to finish at no less than `floor_per_s`.
fn patience(n: usize, floor_per_s: f64) -> Duration {
    Duration::from_secs_f64(30.0 + n as f64 / floor_per_s)
}

/// W1: 1-step tasks, streaming (one producer, one `POST /v1/tasks` at a time
/// while the fleet runs) and drain (all created in bulk, then the workers
/// start), each with 1 and with 2 worker processes.
pub async fn w1(ctx: &Ctx<'_>) -> anyhow::Result<Measured> {
    let n = ctx.sizes.w1_tasks;
    let mut out = Measured::default();
    for (mode, workers) in [("stream", 1), ("stream", 2), ("drain", 1), ("drain", 2)] {
        let key = format!("{mode}_{workers}w");
        let streaming = mode == "stream";
        let mut fleet = ctx
            .fleet(
                &format!("w1_{key}"),
                &[one()],
                if streaming { workers } else { 0 },
                Instrument::None,
            )
            .await?;
        let first_submit = Utc::now();
        let mut workers_at = first_submit;
        if streaming {
            let start = Instant::now();
            for took in fleet.stream("one", n).await? {
                out.sample(&format!("{key}_submit"), ms(took));
            }
            out.figure(
                &format!("{key}_submit_per_s"),
                n as f64 / start.elapsed().as_secs_f64(),
            );
        } else {
            fleet.create_many("one", n).await?;
            out.figure(
                &format!("{key}_create_s"),
                secs_between(first_submit, Utc::now()),
            );
            workers_at = Utc::now();
            fleet.add_workers(workers).await?;
        }
        let finished = fleet.wait_all(patience(n, 20.0)).await?;
        let complete = fleet.completed().await?;
        out.check(
            &format!("{key}_all_complete"),
            finished && complete == n as i64,
            json!({ "tasks": n, "states": fleet.task_states().await? }),
        );
        let last = fleet.last_finished().await?;
        out.figure(
            &format!("{key}_tasks_per_s"),
            n as f64 / secs_between(first_submit, last),
        );
        if !streaming {
            out.figure(
                &format!("{key}_processing_tasks_per_s"),
                n as f64 / secs_between(workers_at, last),
            );
        }
        fleet.stop(&mut out).await?;
    }
    out.info.insert(
        "shape".into(),
        json!({ "tasks": n, "orchestrators": 1, "worker_processes": [1, 2] }),
    );
    Ok(out)
}

/// W2 and W3: tasks one after another (each created with `POST /v1/tasks`
/// once the previous one completed); hops and end to end from the database.
async fn sequential(
    ctx: &Ctx<'_>,
    suffix: &str,
    template: Value,
    tasks: usize,
) -> anyhow::Result<Measured> {
    let mut out = Measured::default();
    let name = template["name"].as_str().unwrap_or_default().to_owned();
    let fleet = ctx
        .fleet(suffix, &[template], 1, Instrument::Results)
        .await?;
    // Warm-up tasks (not measured): connections, prepared statements, listeners.
    for i in 0..ctx.sizes.warmup {
        let id = fleet.create(&name, json!({ "warmup": i })).await?;
        fleet.wait_task(id, Duration::from_secs(60)).await?;
    }
    let mut ids = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let id = fleet.create(&name, json!({ "i": i })).await?;
        fleet.wait_task(id, Duration::from_secs(60)).await?;
        ids.push(id);
    }
    fleet.hops(Some(&ids), &mut out).await?;
    fleet.end_to_end(&ids, &mut out).await?;
    let complete = fleet.completed().await?;
    out.check(
        "all_complete",
        complete == (tasks + ctx.sizes.warmup) as i64,
        json!({ "tasks": tasks, "warmup": ctx.sizes.warmup, "complete": complete }),
    );
    out.info.insert(
        "shape".into(),
        json!({ "tasks": tasks, "warmup_tasks": ctx.sizes.warmup, "orchestrators": 1, "worker_processes": 1 }),
    );
    fleet.stop(&mut out).await?;
    Ok(out)
}

pub async fn w2(ctx: &Ctx<'_>) -> anyhow::Result<Measured> {
    sequential(ctx, "w2", chain(10), ctx.sizes.w2_tasks).await
}

pub async fn w3(ctx: &Ctx<'_>) -> anyhow::Result<Measured> {
    sequential(ctx, "w3", diamond(), ctx.sizes.w3_tasks).await
}

/// W4: one task, root → `width` parallel steps → join.
pub async fn w4(ctx: &Ctx<'_>) -> anyhow::Result<Measured> {
    let width = ctx.sizes.w4_width;
    let mut out = Measured::default();
    let fleet = ctx
        .fleet("w4", &[one(), fan(width)], 1, Instrument::None)
        .await?;
    let warm = fleet.create("one", json!({})).await?;
    fleet.wait_task(warm, Duration::from_secs(60)).await?;
    let id = fleet.create("fan", json!({})).await?;
    fleet
        .wait_task(id, patience(width, 20.0))
        .await
        .context("the fan-out task")?;
    let row: (f64, f64, f64, f64, i64, i64) = sqlx::query_as(&format!(
        "with tr as (
             select s.name, t.to_state, t.at from weft.step_transitions t
             join weft.steps s on s.id = t.step_id where t.task_id = $1
         ),
         root_done as (select at from tr where name = 'root' and to_state = 'complete'),
         wide_done as (select max(at) as at from tr where name like 'w%' and to_state = 'complete'),
         wide_enqueued as (select max(at) as at from tr where name like 'w%' and to_state = 'enqueued')
         select (extract(epoch from {done} - t.created_at) * 1000)::float8,
                (extract(epoch from (select at from wide_done) - (select at from root_done)))::float8,
                (extract(epoch from (select at from wide_enqueued) - (select at from root_done)) * 1000)::float8,
                (extract(epoch from t.finished_at - (select at from wide_done)) * 1000)::float8,
                (select count(*) from tr where name = 'join' and to_state = 'enqueued'),
                (select count(*) from tr where name like 'w%' and to_state = 'complete')
         from weft.tasks t
         join weft.task_transitions tt on tt.task_id = t.id and tt.to_state = 'complete'
         where t.id = $1",
        done = fleet.committed("tt", "t.finished_at")
    ))
    .bind(id)
    .fetch_one(&fleet.pool)
    .await?;
    let (makespan_ms, wide_s, fan_out_ms, join_ms, join_enqueued, wide_complete) = row;
    out.figure("makespan_ms", makespan_ms);
    out.figure("wide_steps_per_s", width as f64 / wide_s);
    out.figure("fan_out_ms", fan_out_ms);
    out.figure("join_ms", join_ms);
    out.figure("join_enqueued", join_enqueued as f64);
    out.check(
        "join_enqueued_once",
        join_enqueued == 1,
        json!({ "join_enqueued_transitions": join_enqueued }),
    );
    out.check(
        "wide_steps_complete",
        wide_complete == width as i64,
        json!({ "width": width, "complete": wide_complete }),
    );
    out.info.insert(
        "shape".into(),
        json!({ "width": width, "orchestrators": 1, "worker_processes": 1 }),
    );
    fleet.stop(&mut out).await?;
    Ok(out)
}

/// W5's default ladder of rates (tasks/s), and the rates tried downwards
/// when the first already falls behind.
const W5_UP: [u32; 10] = [200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 2000];
const W5_DOWN: [u32; 3] = [150, 100, 50];

/// W5: the 5-step DAG submitted open-loop at fixed rates, stepping up until
/// completion falls behind.
pub async fn w5(ctx: &Ctx<'_>) -> anyhow::Result<Measured> {
    let n = ctx.sizes.w5_tasks;
    let mut out = Measured::default();
    let mut levels = Vec::new();
    let mut best: Option<(u32, Measured)> = None;
    let (up, down): (Vec<u32>, Vec<u32>) = match &ctx.sizes.w5_rates {
        Some(rates) => (rates.clone(), Vec::new()),
        None => (W5_UP.to_vec(), W5_DOWN.to_vec()),
    };
    let mut violations_total = 0;
    for (i, rate) in up.iter().copied().enumerate() {
        let (level, measured, keeps_up, violations) = w5_level(ctx, n, rate).await?;
        violations_total += violations;
        levels.push(level);
        merge_memory(&mut out, &measured);
        if keeps_up {
            best = Some((rate, measured));
        } else {
            if i == 0 {
                for rate in down.iter().copied() {
                    let (level, measured, keeps_up, violations) = w5_level(ctx, n, rate).await?;
                    violations_total += violations;
                    levels.push(level);
                    merge_memory(&mut out, &measured);
                    if keeps_up {
                        best = Some((rate, measured));
                        break;
                    }
                }
            }
            break;
        }
    }
    match best {
        Some((rate, measured)) => {
            out.figure("best_rate_tasks_per_s", f64::from(rate));
            for (k, v) in &measured.figures {
                out.figure(&format!("best_{k}"), *v);
            }
            for (k, v) in measured.samples {
                out.samples.insert(k, v);
            }
        }
        None => {
            out.info.insert(
                "best".into(),
                json!("no rate tried kept up; see levels (--w5-rates tries others)"),
            );
        }
    }
    out.figure("invariant_violations", violations_total as f64);
    out.check(
        "zero_invariant_violations",
        violations_total == 0,
        json!({ "violations": violations_total }),
    );
    out.info.insert("levels".into(), Value::Array(levels));
    out.info.insert(
        "shape".into(),
        json!({ "tasks_per_level": n, "steps_per_task": 5, "orchestrators": 1, "worker_processes": 1,
                "keeps_up": "every task complete within max(1 s, 10% of the submission time) after the last submission, and at least 95% of the rate submitted" }),
    );
    Ok(out)
}

fn merge_memory(out: &mut Measured, from: &Measured) {
    for (role, kib) in &from.memory_kib {
        out.memory(role, *kib);
    }
}

/// One W5 level: returns its summary, its measurements, whether it kept up
/// and the invariant violations found afterwards.
async fn w5_level(
    ctx: &Ctx<'_>,
    n: usize,
    rate: u32,
) -> anyhow::Result<(Value, Measured, bool, i64)> {
    let mut out = Measured::default();
    let fleet = ctx
        .fleet(&format!("w5_r{rate}"), &[dag5()], 1, Instrument::Results)
        .await?;
    eprintln!("bench: W5 at {rate} tasks/s ({n} tasks)");

    // Queue depth every 500 ms, from a connection of its own.
    let sampler_pool = connect(&fleet.url, 1).await?;
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = stop_sampling.clone();
        let start = Instant::now();
        tokio::spawn(async move {
            let mut series: Vec<Value> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let rows: Vec<(String, i64, i64)> =
                    sqlx::query_as("select queue_name, depth, in_flight from weft.queue_stats()")
                        .fetch_all(&sampler_pool)
                        .await
                        .unwrap_or_default();
                let get = |q: &str| {
                    rows.iter()
                        .find(|r| r.0 == q)
                        .map(|r| (r.1, r.2))
                        .unwrap_or((0, 0))
                };
                let (steps_waiting, steps_in_flight) = get("weft_steps_bench");
                let (results_waiting, _) = get("weft_results");
                series.push(json!([
                    (start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                    steps_waiting,
                    steps_in_flight,
                    results_waiting
                ]));
            }
            sampler_pool.close().await;
            series
        })
    };

    // Open loop: every 10 ms, submit what the schedule says is due, in one
    // batch call that does not hold up the next tick.
    let in_flight = Arc::new(Semaphore::new(16));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first_submit = Utc::now();
    let start = Instant::now();
    let mut submitted = 0usize;
    let mut calls = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while submitted < n {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(n);
        if due <= submitted {
            continue;
        }
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            continue; // all calls busy: what is due goes with the next one
        };
        let (http, api, errors) = (fleet.http.clone(), fleet.api.clone(), Arc::clone(&errors));
        let (first, count) = (submitted, due - submitted);
        submitted = due;
        calls.push(tokio::spawn(async move {
            if let Err(e) = create_batch(&http, &api, "dag5", first, count).await {
                eprintln!("bench: W5 submission failed: {e:#}");
                errors.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        }));
    }
    for call in calls {
        let _ = call.await;
    }
    let submit_s = start.elapsed().as_secs_f64();
    let last_submit = Utc::now();
    let finished = fleet.wait_all(patience(n, 20.0)).await?;
    stop_sampling.cancel();
    let series = sampler.await.unwrap_or_default();

    let last = fleet.last_finished().await?;
    let drain_s = secs_between(last_submit, last).max(0.0);
    let failed_submissions = errors.load(std::sync::atomic::Ordering::Relaxed);
    let achieved = (n - failed_submissions) as f64 / submit_s;
    let complete = fleet.completed().await?;
    let keeps_up = finished
        && failed_submissions == 0
        && complete == n as i64
        && drain_s <= (0.1 * submit_s).max(1.0)
        && achieved >= 0.95 * f64::from(rate);
    let steps_per_s = 5.0 * complete as f64 / secs_between(first_submit, last);
    out.figure("steps_per_s", steps_per_s);
    out.figure("submitted_tasks_per_s", achieved);
    out.figure("drain_s", drain_s);
    fleet.hops(None, &mut out).await?;
    let ids: Vec<Uuid> = sqlx::query_scalar("select id from weft.tasks")
        .fetch_all(&fleet.pool)
        .await?;
    fleet.end_to_end(&ids, &mut out).await?;
    let (violations, which) = fleet.invariant_violations().await?;
    let p =
        |k: &str, q: f64| super::stats::percentile(out.samples.get(k).map_or(&[][..], |v| v), q);
    let max_waiting = series
        .iter()
        .filter_map(|s| s[1].as_i64())
        .max()
        .unwrap_or(0);
    let level = json!({
        "rate_tasks_per_s": rate,
        "keeps_up": keeps_up,
        "submitted_tasks_per_s": round2(achieved),
        "submit_s": round2(submit_s),
        "drain_s": round2(drain_s),
        "complete": complete,
        "steps_per_s": round2(steps_per_s),
        "hop_p50_ms": p("hop", 50.0).map(round2),
        "hop_p99_ms": p("hop", 99.0).map(round2),
        "e2e_p99_ms": p("e2e", 99.0).map(round2),
        "max_steps_waiting": max_waiting,
        "invariant_violations": violations,
        "violated": which,
        "queue_depth": { "columns": ["t_s", "steps_waiting", "steps_in_flight", "results_waiting"], "every_ms": 500, "samples": series },
    });
    eprintln!(
        "bench: W5 at {rate} tasks/s: {} ({:.0} steps/s, drain {:.1} s)",
        if keeps_up { "keeps up" } else { "falls behind" },
        steps_per_s,
        drain_s
    );
    fleet.stop(&mut out).await?;
    Ok((level, out, keeps_up, violations))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// W6: tasks whose only step fails retryably twice.
pub async fn w6(ctx: &Ctx<'_>) -> anyhow::Result<Measured> {
    let n = ctx.sizes.w6_tasks;
    let mut out = Measured::default();
    let fleet = ctx.fleet("w6", &[flaky()], 1, Instrument::RetryDue).await?;
    let first_submit = Utc::now();
    fleet.create_many("flaky", n).await?;
    let finished = fleet.wait_all(patience(n, 10.0)).await?;
    let complete = fleet.completed().await?;
    out.check(
        "all_complete",
        finished && complete == n as i64,
        json!({ "tasks": n, "states": fleet.task_states().await? }),
    );
    let (exact, total): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where s.attempts = 3
                                   and (select count(*) from weft.step_transitions t
                                        where t.step_id = s.id and t.to_state = 'enqueued') = 3),
                count(*)
         from weft.steps s",
    )
    .fetch_one(&fleet.pool)
    .await?;
    out.check(
        "exactly_3_attempts_each",
        exact == total && total == n as i64,
        json!({ "steps": total, "with_exactly_3_attempts": exact }),
    );
    let lateness: Vec<f64> = sqlx::query_scalar(&format!(
        "select (extract(epoch from {} - d.due) * 1000)::float8
         from bench.retry_due d
         join weft.step_transitions t
           on t.step_id = d.step_id and t.attempt = d.attempt + 1 and t.to_state = 'enqueued'",
        fleet.committed("t", "t.at")
    ))
    .fetch_all(&fleet.pool)
    .await?;
    out.check(
        "every_retry_measured",
        lateness.len() == 2 * n,
        json!({ "retries": lateness.len(), "expected": 2 * n }),
    );
    for l in lateness {
        out.sample("lateness", l);
    }
    let last = fleet.last_finished().await?;
    out.figure("makespan_ms", secs_between(first_submit, last) * 1e3);
    out.info.insert(
        "shape".into(),
        json!({ "tasks": n, "attempts": 3, "backoff": "initial 100 ms, multiplier 2, full jitter",
                "orchestrators": 1, "worker_processes": 1 }),
    );
    fleet.stop(&mut out).await?;
    Ok(out)
}

/// W7: one orchestrator and two workers idle. Each process gets a database
/// of its own, so the server's per-database transaction counters count
/// each process separately while all three run at once.
pub async fn w7(ctx: &Ctx<'_>) -> anyhow::Result<Measured> {
    let secs = ctx.sizes.w7_secs;
    let mut out = Measured::default();
    let roles = [
        ("orchestrator", "w7_orch"),
        ("worker1", "w7_worker1"),
        ("worker2", "w7_worker2"),
    ];
    let mut dbs = Vec::new();
    for (_, suffix) in roles {
        let (name, url) = ctx.server.fresh(suffix).await?;
        // Register the namespace so the worker's queue exists.
        let pool = connect(&url, 1).await?;
        register(&pool, &[one()]).await?;
        pool.close().await;
        dbs.push((name, url));
    }
    let mut procs = Vec::new();
    for ((role, suffix), (_, url)) in roles.iter().zip(&dbs) {
        let name = format!("weft-bench-{suffix}");
        let proc = if *role == "orchestrator" {
            ctx.launcher.orchestrator(url, &name).await?
        } else {
            ctx.launcher.worker(url, &name).await?
        };
        procs.push(proc);
    }
    // Let startup (listeners, first polls) settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut before = Vec::new();
    for ((_, (db, _)), proc) in roles.iter().zip(&dbs).zip(&procs) {
        before.push((
            ctx.server.transactions(db).await?,
            cpu_ticks(proc.pid).unwrap_or(0),
        ));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let mut after = Vec::new();
    for ((_, (db, _)), proc) in roles.iter().zip(&dbs).zip(&procs) {
        after.push((
            ctx.server.transactions(db).await?,
            cpu_ticks(proc.pid).unwrap_or(0),
        ));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let hz = ticks_per_second();
    for (((role, _), b), a) in roles.iter().zip(&before).zip(&after) {
        out.figure(&format!("{role}_tx_per_s"), (a.0 - b.0) as f64 / elapsed);
        out.figure(
            &format!("{role}_cpu_pct"),
            (a.1.saturating_sub(b.1)) as f64 / hz / elapsed * 100.0,
        );
    }
    for proc in procs {
        let role = proc.role;
        let usage = proc.stop().await?;
        out.memory(role, usage.peak_rss_kib);
    }
    if !ctx.keep {
        for (db, _) in &dbs {
            ctx.server.drop_database(db).await?;
        }
    }
    out.info.insert(
        "shape".into(),
        json!({ "idle_s": secs, "orchestrators": 1, "worker_processes": 2,
                "method": "each process on a database of its own; pg_stat_database xact_commit + xact_rollback deltas; /proc/<pid>/stat utime + stime deltas" }),
    );
    Ok(out)
}
