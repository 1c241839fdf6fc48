//! Command-line and environment configuration: one clap struct per command,
//! every field with a `WEFT_*` variable, a default and a doc comment. Only
//! this module reads the environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Weft: workflows on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bring the database to this build's schema (installs pgmq too).
    ///
    /// Example: DATABASE_URL=postgres://localhost/weft weft migrate
    Migrate(DbArgs),
    /// Run an orchestrator: the API, the result collectors and the retry scheduler.
    ///
    /// Example: weft orchestrator --http-addr 0.0.0.0:8080
    Orchestrator(OrchestratorArgs),
    /// Run a worker serving one namespace's queue.
    ///
    /// Example: weft worker --namespace shop --concurrency 32
    Worker(WorkerArgs),
    /// Check the database's invariants; exits non-zero with a report when any is violated.
    ///
    /// Example: weft check --grace 30s
    Check(CheckArgs),
    /// Everything on one machine: a private PostgreSQL, an orchestrator and
    /// workers, the example templates and a run of each.
    ///
    /// Example: weft dev
    Dev(DevArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Largest number of database connections this process opens.
    #[arg(long, env = "WEFT_DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
}

fn duration(text: &str) -> Result<Duration, String> {
    shared::template::parse_duration(text)
}

#[derive(Debug, Clone, Args)]
pub struct OrchestratorArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Address of the REST API, health and metrics.
    #[arg(long, env = "WEFT_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Result collector loops in this process.
    #[arg(long, env = "WEFT_COLLECTORS", default_value_t = 2)]
    pub collectors: usize,
    /// Results applied per transaction.
    #[arg(long, env = "WEFT_RESULT_BATCH", default_value_t = 100)]
    pub result_batch: i32,
    /// How long a result read by a collector stays hidden; if the collector
    /// dies, its results reappear after this.
    #[arg(long, env = "WEFT_RESULT_LEASE", default_value = "30s", value_parser = duration)]
    pub result_lease: Duration,
    /// Fallback poll interval when no notification arrives (jittered).
    #[arg(long, env = "WEFT_POLL_INTERVAL", default_value = "5s", value_parser = duration)]
    pub poll_interval: Duration,
    /// Run migrations at startup.
    #[arg(long, env = "WEFT_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The namespace whose queue this worker serves.
    #[arg(long, env = "WEFT_NAMESPACE")]
    pub namespace: String,
    /// Address of health and metrics.
    #[arg(long, env = "WEFT_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    pub http_addr: SocketAddr,
    /// Handlers run at once.
    #[arg(long, env = "WEFT_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// How long a step message stays leased to this worker without a
    /// heartbeat; a dead worker's steps are redelivered after it.
    #[arg(long, env = "WEFT_LEASE", default_value = "30s", value_parser = duration)]
    pub lease: Duration,
    /// Results sent per transaction.
    #[arg(long, env = "WEFT_RESULT_BATCH", default_value_t = 64)]
    pub result_batch: usize,
    /// Fallback poll interval when no notification arrives (jittered).
    #[arg(long, env = "WEFT_POLL_INTERVAL", default_value = "5s", value_parser = duration)]
    pub poll_interval: Duration,
    /// On SIGTERM, how long in-flight handlers may run before the worker exits.
    #[arg(long, env = "WEFT_DRAIN_DEADLINE", default_value = "25s", value_parser = duration)]
    pub drain_deadline: Duration,
    /// Deliveries of one message without a result before it is dead-lettered.
    #[arg(long, env = "WEFT_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: i32,
    /// Allow the `builtin.exec` handler to run commands.
    #[arg(long, env = "WEFT_ALLOW_EXEC", default_value_t = false)]
    pub allow_exec: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Use this database instead of starting the private cluster.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Port of the private PostgreSQL cluster.
    #[arg(long, env = "WEFT_PG_PORT", default_value_t = 55432)]
    pub pg_port: u16,
    /// Address of the orchestrator's API.
    #[arg(long, env = "WEFT_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Directory of example templates (*.yaml) to apply and run.
    #[arg(long, env = "WEFT_EXAMPLES", default_value = "examples")]
    pub examples: std::path::PathBuf,
    /// Exit once the example tasks have finished instead of serving until Ctrl-C.
    #[arg(long, env = "WEFT_DEV_EXIT", default_value_t = false)]
    pub exit_when_done: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Leave work younger than this alone (a retry just due, a result not yet applied).
    #[arg(long, env = "WEFT_CHECK_GRACE", default_value = "30s", value_parser = duration)]
    pub grace: Duration,
}
