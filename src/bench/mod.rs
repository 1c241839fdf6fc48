//! `weft bench`: the benchmark workloads W0 to W7 (`docs/benchmarks.md`).
//!
//! Every Weft workload runs real `weft orchestrator` and `weft worker`
//! processes (this binary, or `--weft-bin`) on a fresh database of its own,
//! drives them through the HTTP API as a client would, and reads its
//! figures from the database's own timestamps afterwards (plus a little
//! bench-only instrumentation, see `fleet.rs`). W0 calibrates the machine
//! with the bare SQL round trip of one step through pgmq.
//!
//! Output: one JSON object per line on stdout (first the machine, then one
//! per workload), then a markdown table; progress goes to stderr.

mod calibrate;
mod fleet;
mod procs;
mod report;
mod server;
pub mod stats;
mod workloads;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::config::BenchArgs;

/// What one run of one workload measured.
#[derive(Debug, Default, Clone)]
pub struct Measured {
    /// Scalar figures; across runs, their median is reported.
    pub figures: BTreeMap<String, f64>,
    /// Samples in ms; percentiles are taken over the samples of all runs.
    pub samples: BTreeMap<String, Vec<f64>>,
    /// Correctness checks: whether each held, and what was seen.
    pub checks: BTreeMap<String, (bool, Value)>,
    /// Peak resident memory (VmHWM) by process role, KiB: the largest of
    /// the processes of that role.
    pub memory_kib: BTreeMap<String, u64>,
    /// Shape, parameters, series.
    pub info: serde_json::Map<String, Value>,
}

impl Measured {
    pub fn figure(&mut self, name: &str, value: f64) {
        self.figures.insert(name.to_owned(), value);
    }

    pub fn sample(&mut self, name: &str, ms: f64) {
        self.samples.entry(name.to_owned()).or_default().push(ms);
    }

    pub fn check(&mut self, name: &str, pass: bool, detail: Value) {
        self.checks.insert(name.to_owned(), (pass, detail));
    }

    pub fn memory(&mut self, role: &str, kib: u64) {
        let entry = self.memory_kib.entry(role.to_owned()).or_default();
        *entry = (*entry).max(kib);
    }
}

/// The workloads, in the order they run.
pub const WORKLOADS: [(&str, &str); 8] = [
    ("W0", "calibration: bare SQL round trip through pgmq"),
    ("W1", "throughput: 1-step tasks, streaming and drain"),
    ("W2", "chain: 10 steps, tasks one after another"),
    (
        "W3",
        "diamond: A, then B and C, then D; tasks one after another",
    ),
    (
        "W4",
        "fan-out: 1, then 1,000 parallel, then 1 join; one task",
    ),
    ("W5", "mixed load: 5-step DAG, open loop at stepped rates"),
    ("W6", "retry storm: one step failing retryably twice"),
    ("W7", "idle: 1 orchestrator and 2 workers"),
];

/// Workload sizes.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub w0_sequential: usize,
    pub w0_clients: usize,
    pub w0_per_client: usize,
    pub w1_tasks: usize,
    pub w2_tasks: usize,
    pub w3_tasks: usize,
    pub warmup: usize,
    pub w4_width: usize,
    pub w5_tasks: usize,
    pub w5_rates: Option<Vec<u32>>,
    pub w6_tasks: usize,
    pub w7_secs: u64,
}

impl Sizes {
    pub fn new(args: &BenchArgs) -> Sizes {
        let s = |full: usize, smoke: usize| -> usize {
            let base = if args.smoke { smoke } else { full };
            ((base as f64 * args.scale).round() as usize).max(1)
        };
        Sizes {
            w0_sequential: s(1000, 100),
            w0_clients: 4,
            w0_per_client: s(500, 50),
            w1_tasks: s(10_000, 200),
            w2_tasks: s(200, 10),
            w3_tasks: s(200, 10),
            warmup: if args.smoke { 2 } else { 5 },
            w4_width: s(1000, 100),
            w5_tasks: s(10_000, 150),
            w5_rates: args
                .w5_rates
                .clone()
                .or_else(|| args.smoke.then(|| vec![50, 100])),
            w6_tasks: s(1000, 50),
            w7_secs: args.w7_secs.unwrap_or(if args.smoke { 5 } else { 60 }),
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let mut selected = Vec::new();
    for w in &args.workloads {
        let id = w.trim().to_uppercase();
        if !WORKLOADS.iter().any(|(known, _)| *known == id) {
            bail!("unknown workload {w:?}; known: W0 to W7");
        }
        if !selected.contains(&id) {
            selected.push(id);
        }
    }
    selected.sort();
    let runs = args.runs.max(1);
    let sizes = Sizes::new(&args);
    let bin = match &args.weft_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe().context("finding the weft binary")?,
    };
    let server = server::Server::open(
        args.database_url.as_deref(),
        args.pg_port,
        args.allow_nondurable,
        &args.db_settings,
    )
    .await?;
    let launcher = procs::Launcher {
        bin: bin.clone(),
        concurrency: args.concurrency.max(1),
        orchestrator_args: args.orchestrator_args.clone(),
        worker_args: args.worker_args.clone(),
        log: args.child_log.clone(),
    };
    let setup = json!({
        "binary": bin.display().to_string(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "runs": runs,
        "smoke": args.smoke,
        "scale": args.scale,
        "orchestrator_flags": [["--poll-interval", "5s", "--auth", "off"], args.orchestrator_args],
        "worker_flags": [["--concurrency", launcher.concurrency.to_string()], ["--poll-interval", "5s"], args.worker_args],
        "commit_timestamps": server.commit_ts,
        "db_settings": args.db_settings,
        "load_average_at_start": server::load_average(),
        "source_tree": source_tree(),
    });
    println!(
        "{}",
        json!({ "machine": server.description, "setup": setup })
    );

    let ctx = workloads::Ctx {
        server: &server,
        launcher: &launcher,
        keep: args.keep_databases,
        sizes: &sizes,
    };
    let mut results: BTreeMap<String, Vec<Measured>> = BTreeMap::new();
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for round in 1..=runs {
        for id in &selected {
            let load = server::load_average();
            // The disk decides durable commits, and neighbours' I/O moves it
            // a lot on shared machines: note what it was before each run.
            let commit_ms = server.commit_probe().await.ok();
            eprintln!(
                "bench: {id} run {round}/{runs} (load average {}, durable commit p50 {} ms)",
                load.map_or("?".into(), |l| format!("{l:.2}")),
                commit_ms.map_or("?".into(), |c| format!("{c:.2}"))
            );
            let start = Instant::now();
            match run_one(id, &ctx).await {
                Ok(mut m) => {
                    m.info.insert("load_average_before".into(), json!(load));
                    m.info
                        .insert("commit_p50_ms_before".into(), json!(commit_ms));
                    m.info
                        .insert("wall_s".into(), json!(start.elapsed().as_secs_f64()));
                    eprintln!(
                        "bench: {id} run {round}/{runs} done in {:.1} s: {}",
                        start.elapsed().as_secs_f64(),
                        report::brief(&m)
                    );
                    results.entry(id.clone()).or_default().push(m);
                }
                Err(e) => {
                    eprintln!("bench: {id} run {round}/{runs} failed: {e:#}");
                    errors.entry(id.clone()).or_default().push(format!("{e:#}"));
                }
            }
        }
    }

    let aggregates: Vec<report::Aggregate> = selected
        .iter()
        .map(|id| {
            report::Aggregate::new(
                id,
                results.remove(id).unwrap_or_default(),
                errors.remove(id).unwrap_or_default(),
            )
        })
        .collect();
    let calibration = report::Calibration::from(&aggregates);
    let targets: Vec<report::Target> = report::targets(&aggregates, &calibration)
        .into_iter()
        .filter(|t| selected.contains(&t.workload) || t.workload == "memory")
        .collect();
    let mut ok = true;
    for agg in &aggregates {
        println!("{}", agg.to_json(&calibration, &targets));
        ok &= agg.errors.is_empty() && agg.checks_pass();
    }
    println!();
    print!(
        "{}",
        report::markdown(
            &server.description,
            &setup,
            &aggregates,
            &calibration,
            &targets
        )
    );
    server.close(args.keep_databases).await;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run_one(id: &str, ctx: &workloads::Ctx<'_>) -> anyhow::Result<Measured> {
    match id {
        "W0" => {
            let (_, url) = ctx.server.fresh("w0").await?;
            let m = calibrate::run(
                &url,
                ctx.sizes.w0_sequential,
                ctx.sizes.w0_clients,
                ctx.sizes.w0_per_client,
            )
            .await;
            if !ctx.keep {
                let name = server::database_name(&url).unwrap_or_default();
                ctx.server.drop_database(&name).await?;
            }
            m
        }
        "W1" => workloads::w1(ctx).await,
        "W2" => workloads::w2(ctx).await,
        "W3" => workloads::w3(ctx).await,
        "W4" => workloads::w4(ctx).await,
        "W5" => workloads::w5(ctx).await,
        "W6" => workloads::w6(ctx).await,
        "W7" => workloads::w7(ctx).await,
        other => bail!("unknown workload {other}"),
    }
}

/// The commit of the source tree this binary was built in, when it is
/// still there (`+dirty` when it has uncommitted changes).
fn source_tree() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}+dirty")
    } else {
        commit
    })
}
