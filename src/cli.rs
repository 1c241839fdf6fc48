//! Command dispatch: build the runtime, tracing and pool, then call the library.

use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{AuthMode, Cli, Command, DbArgs, LogFormat, OrchestratorArgs, WorkerArgs};

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `weft dev` prints its own live view; only problems go to the log there.
    let default_filter = if matches!(cli.command, Command::Dev(_)) {
        "warn"
    } else {
        "info,sqlx=warn"
    };
    let traces = {
        let _guard = runtime.enter();
        install_tracing(
            cli.log_format,
            default_filter,
            cli.otlp_endpoint.as_deref(),
            &cli.otel_service_name,
        )
    };
    let code = match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(provider) = traces {
        // Flush what the batch exporter still holds.
        let _ = provider.shutdown();
    }
    code
}

/// Installs the log subscriber, and the OpenTelemetry layer when an OTLP
/// endpoint is configured; returns the tracer provider to flush at exit.
fn install_tracing(
    format: LogFormat,
    default_filter: &str,
    otlp_endpoint: Option<&str>,
    service_name: &str,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = otlp_endpoint.and_then(|endpoint| match otlp_provider(endpoint, service_name) {
        Ok(provider) => Some(provider),
        Err(e) => {
            eprintln!("warning: traces are off: cannot build the OTLP exporter: {e}");
            None
        }
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("weft")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("warning: logging already installed: {e}");
    }
    provider
}

fn otlp_provider(
    endpoint: &str,
    service_name: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig;
    // OTEL_EXPORTER_OTLP_ENDPOINT is a base URL; traces go to /v1/traces under it.
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate(db) => {
            let pool = connect(&db).await?;
            shared::migrate::run(&pool).await.context("migrating")?;
            info!("database is at the current schema");
            Ok(ExitCode::SUCCESS)
        }
        Command::Orchestrator(args) => {
            run_orchestrator(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(args) => {
            run_worker(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let pool = connect(&args.db).await?;
            let checks = orchestrator::store::check_invariants(&pool, args.grace).await?;
            let mut violated = false;
            for check in &checks {
                let mark = if check.violations == 0 {
                    "ok  "
                } else {
                    "FAIL"
                };
                println!(
                    "{mark} {} ({} violations)",
                    check.invariant, check.violations
                );
                for example in check.examples.iter().flatten() {
                    println!("       e.g. {example}");
                }
                violated |= check.violations > 0;
            }
            Ok(if violated {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Prune(args) => {
            let pool = connect(&args.db).await?;
            let stop = CancellationToken::new();
            let pruned =
                orchestrator::pruner::prune(&pool, args.older_than, args.batch_size.max(1), &stop)
                    .await?;
            println!(
                "pruned {} tasks and {} archived queue messages",
                pruned.tasks, pruned.archived_messages
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Template(args) => Ok(crate::client::template(args).await),
        Command::Task(args) => Ok(crate::client::task(args).await),
        Command::Queue(args) => Ok(crate::client::queue(args).await),
        Command::Dlq(args) => Ok(crate::client::dlq(args).await),
        Command::Bench(args) => crate::bench::run(args).await,
    }
}

/// Opens the pool, retrying while the database is not up yet (containers
/// start in any order).
pub async fn connect(db: &DbArgs) -> anyhow::Result<PgPool> {
    connect_url(&db.database_url, db.db_max_connections).await
}

/// How long a pooled connection may sit idle and still be used without a ping.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

pub async fn connect_url(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // A connection is pinged before use only when it sat idle for a
        // while (as PgBouncer's server_check_delay): sqlx's default pings on
        // every acquire, a round trip and a backend wake-up in front of
        // every API statement. A connection broken while in use is closed
        // by the ping sqlx sends when it is released; one that broke while
        // idle (a database restart) is caught here.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_PING {
                    conn.ping().await?;
                }
                Ok(true)
            })
        });
    // No JIT: Weft's statements are short, and a cost estimate that crosses
    // jit_above_cost after an ANALYZE made every execution compile for
    // seconds (see migrations/…_no_jit.sql).
    let connect = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .options([("jit", "off")]);
    let mut delay = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match options.clone().connect_with(connect.clone()).await {
            Ok(pool) => return Ok(pool),
            Err(e) if tokio::time::Instant::now() < deadline => {
                info!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("connecting to the database"),
        }
    }
}

/// A token cancelled by SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
                _ = term.recv() => info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        trigger.cancel();
    });
    token
}

pub fn orchestrator_config(
    args: &OrchestratorArgs,
) -> anyhow::Result<orchestrator::OrchestratorConfig> {
    Ok(orchestrator::OrchestratorConfig {
        http_addr: Some(args.http_addr),
        auth: api_auth(args)?,
        collectors: args.collectors,
        collector: orchestrator::CollectorConfig {
            batch_size: args.result_batch,
            lease: args.result_lease,
            poll_interval: args.poll_interval,
            linger: args.batch_linger,
        },
        scheduler: orchestrator::SchedulerConfig {
            poll_interval: args.poll_interval,
            ..orchestrator::SchedulerConfig::default()
        },
        metrics_interval: args.metrics_interval,
        pruner: orchestrator::pruner::PrunerConfig {
            retention: args.retention,
            ..orchestrator::pruner::PrunerConfig::default()
        },
    })
}

/// The API's tokens from `--auth-tokens-file` and `--auth-tokens`; with
/// `--auth on` and none configured, the error that tells how to fix it.
fn api_auth(args: &OrchestratorArgs) -> anyhow::Result<orchestrator::Auth> {
    if args.auth == AuthMode::Off {
        return Ok(orchestrator::Auth::Off);
    }
    let mut tokens = Vec::new();
    if let Some(path) = &args.auth_tokens_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --auth-tokens-file {}", path.display()))?;
        orchestrator::api::parse_tokens(&text, &path.display().to_string(), &mut tokens)?;
    }
    if let Some(text) = &args.auth_tokens {
        orchestrator::api::parse_tokens(text, "WEFT_AUTH_TOKENS", &mut tokens)?;
    }
    let auth = orchestrator::Auth::with_tokens(tokens);
    auth.check()?;
    Ok(auth)
}

async fn run_orchestrator(args: OrchestratorArgs) -> anyhow::Result<()> {
    // Configuration errors first, before waiting for the database.
    let config = orchestrator_config(&args)?;
    let pool = connect(&args.db).await?;
    if args.migrate {
        shared::migrate::run(&pool).await.context("migrating")?;
    }
    let shutdown = shutdown_on_signals();
    orchestrator::run(config, pool.clone(), shutdown).await?;
    pool.close().await;
    Ok(())
}

pub fn worker_config(args: &WorkerArgs) -> anyhow::Result<worker::WorkerConfig> {
    let namespace = shared::Namespace::parse(args.namespace.clone()).context("--namespace")?;
    let mut config = worker::WorkerConfig::new(namespace);
    config.concurrency = args.concurrency.max(1);
    config.lease = args.lease;
    config.heartbeat = args.lease / 3;
    config.batch_size = args.result_batch.max(1);
    config.completion_linger = args.completion_linger;
    config.batch_linger = args.batch_linger;
    config.read_linger = args.batch_linger;
    config.poll_interval = args.poll_interval;
    config.drain_deadline = args.drain_deadline;
    config.max_deliveries = args.max_deliveries;
    config.allow_exec = args.allow_exec;
    Ok(config)
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let config = worker_config(&args)?;
    let pool = connect(&args.db).await?;
    let shutdown = shutdown_on_signals();
    let worker = worker::Worker::builder(config).build();
    crate::health::serve_worker(
        args.http_addr,
        pool.clone(),
        worker.state(),
        shutdown.clone(),
    )
    .await?;
    worker.run(pool.clone(), shutdown).await?;
    pool.close().await;
    Ok(())
}
