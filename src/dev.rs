//! `weft dev`: Weft's main job on one machine. Starts (or reuses) the private
//! PostgreSQL cluster, migrates, runs an orchestrator and one worker per
//! example namespace in this process, applies the example templates, runs one
//! task of each and shows their steps changing state live, then the outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::task::TaskTracker;

use orchestrator::store::{self, Registered};
use orchestrator::tasks::{self, CreateTask};
use shared::template::Template;
use shared::{StepState, TaskId};

use crate::cli;
use crate::config::DevArgs;

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            eprintln!(
                "starting the private PostgreSQL cluster on port {}",
                args.pg_port
            );
            let port = args.pg_port;
            tokio::task::spawn_blocking(move || crate::pg::start(port)).await??
        }
    };
    let templates = load_examples(&args.examples)?;
    // One pool for the orchestrator, a worker per namespace and the
    // examples: the loops hold their connections (6 for the orchestrator,
    // 3 per worker), and the API and heartbeats need some besides.
    let namespaces = templates
        .iter()
        .map(|t| &t.namespace)
        .collect::<BTreeSet<_>>()
        .len();
    let workers = u32::try_from(namespaces).unwrap_or(u32::MAX / 8);
    let pool = cli::connect_url(&url, 20 + 4 * workers).await?;
    shared::migrate::run(&pool).await.context("migrating")?;
    eprintln!("database ready at {url}");

    let shutdown = cli::shutdown_on_signals();
    let tracker = TaskTracker::new();
    if !args.http_addr.ip().is_loopback() {
        eprintln!(
            "warning: the API on {} is reachable from other machines and asks for no token \
             (weft dev runs it with --auth off); use weft orchestrator with tokens instead",
            args.http_addr
        );
    }
    let config = orchestrator::OrchestratorConfig {
        http_addr: Some(args.http_addr),
        // Loopback by default, for one developer: no tokens to set up.
        auth: orchestrator::Auth::Off,
        collector: orchestrator::CollectorConfig {
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        },
        scheduler: orchestrator::SchedulerConfig {
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    {
        let (pool, stop) = (pool.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = orchestrator::run(config, pool, stop.clone()).await {
                eprintln!("orchestrator failed: {e}");
                stop.cancel();
            }
        });
    }
    let namespaces: BTreeSet<shared::Namespace> =
        templates.iter().map(|t| t.namespace.clone()).collect();
    for namespace in namespaces {
        let mut config = worker::WorkerConfig::new(namespace);
        config.poll_interval = Duration::from_secs(1);
        let worker = worker::Worker::builder(config).build();
        let (pool, stop) = (pool.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = worker.run(pool, stop.clone()).await {
                eprintln!("worker failed: {e}");
                stop.cancel();
            }
        });
    }

    let outcome = run_examples(&pool, &templates).await;
    match &outcome {
        Ok(true) => eprintln!("\nall example tasks finished as expected"),
        Ok(false) => eprintln!("\nsome example tasks did not complete"),
        Err(e) => eprintln!("\nrunning the examples failed: {e:#}"),
    }
    if !args.exit_when_done && outcome.is_ok() {
        eprintln!(
            "Weft is running: API at http://{}/v1 (try: curl http://{}/v1/templates). Ctrl-C to stop.",
            args.http_addr, args.http_addr
        );
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    pool.close().await;
    if args.database_url.is_none() {
        eprintln!(
            "the private PostgreSQL keeps running for next time; stop it with: scripts/pg stop"
        );
    }
    match outcome {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::FAILURE),
        Err(e) => Err(e),
    }
}

fn load_examples(dir: &std::path::Path) -> anyhow::Result<Vec<Template>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the examples directory {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no templates in {}", dir.display());
    }
    paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Template::parse(&text).with_context(|| format!("{}", p.display()))
        })
        .collect()
}

/// Applies the templates, starts one task of each and prints every step
/// transition until all tasks end. Returns whether all completed.
async fn run_examples(pool: &PgPool, templates: &[Template]) -> anyhow::Result<bool> {
    let mut tasks = Vec::new();
    let cache = tasks::TemplateCache::default();
    for template in templates {
        let mut conn = pool.acquire().await?;
        let label = format!(
            "{}/{}@{}",
            template.namespace, template.name, template.version
        );
        match store::register_template(&mut conn, template).await? {
            Registered::Created(_) => eprintln!("template {label}: created"),
            Registered::Unchanged(_) => eprintln!("template {label}: unchanged"),
        }
        let created = tasks::create_task(
            pool,
            &cache,
            CreateTask {
                namespace: template.namespace.to_string(),
                name: template.name.to_string(),
                version: Some(template.version),
                input: json!({ "example": template.name.as_str() }),
                priority: 0,
                idempotency_key_hash: None,
                request_hash: None,
            },
        )
        .await?;
        eprintln!("task {} started for {label}", created.id());
        tasks.push((label, created.id()));
    }
    eprintln!();
    let started = Instant::now();
    let mut seen: BTreeMap<(TaskId, String), (StepState, i32)> = BTreeMap::new();
    let mut finished: BTreeMap<TaskId, shared::TaskState> = BTreeMap::new();
    while finished.len() < tasks.len() {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("example tasks did not finish within 120 s");
        }
        for (label, id) in &tasks {
            if finished.contains_key(id) {
                continue;
            }
            let steps = store::get_steps(pool, *id).await?;
            for step in &steps {
                let key = (*id, step.name.clone());
                let now = (step.state, step.attempts);
                if seen.get(&key) != Some(&now) {
                    let detail = match (&step.state, &step.last_error) {
                        (StepState::WaitingRetry | StepState::Error, Some(e)) => {
                            format!(
                                "  ({})",
                                e.get("message")
                                    .and_then(|m| m.as_str())
                                    .unwrap_or("failed")
                            )
                        }
                        _ => String::new(),
                    };
                    eprintln!(
                        "{:>8.3}s  {label:<18} {:<10} {:<14} attempt {}{detail}",
                        started.elapsed().as_secs_f64(),
                        step.name,
                        step.state.as_str(),
                        step.attempts
                    );
                    seen.insert(key, now);
                }
            }
            if let Some(task) = store::get_task(pool, *id).await? {
                if task.state.is_terminal() {
                    eprintln!(
                        "{:>8.3}s  {label:<18} task {}",
                        started.elapsed().as_secs_f64(),
                        task.state.as_str().to_uppercase()
                    );
                    finished.insert(*id, task.state);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("\noutputs:");
    for (label, id) in &tasks {
        for step in store::get_steps(pool, *id).await? {
            let output = step
                .output
                .map(|o| o.to_string())
                .unwrap_or_else(|| "-".into());
            eprintln!("  {label:<18} {:<10} {output}", step.name);
        }
    }
    Ok(finished.values().all(|s| *s == shared::TaskState::Complete))
}
