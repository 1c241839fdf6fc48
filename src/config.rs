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
    /// Export traces with OTLP/HTTP to this collector (the standard
    /// OpenTelemetry variable; the other OTEL_* variables apply too). Off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Service name on exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "weft", global = true)]
    pub otel_service_name: String,
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
    /// Delete finished tasks, their steps and history, and queue archive rows
    /// older than a duration, in bounded batches. Running tasks are never touched.
    ///
    /// Example: weft prune --older-than 720h
    Prune(PruneArgs),
    /// Everything on one machine: a private PostgreSQL, an orchestrator and
    /// workers, the example templates and a run of each.
    ///
    /// Example: weft dev
    Dev(DevArgs),
    /// Client: apply template files, list and show registered templates.
    ///
    /// Example: weft template apply examples/*.yaml
    Template(TemplateArgs),
    /// Client: create tasks (and watch them run), inspect, cancel and repair them.
    ///
    /// Example: weft task create demo/diamond --input '{"order":7}' --wait
    Task(TaskArgs),
    /// Client: per-queue depth, messages in flight and the oldest message's age.
    ///
    /// Example: weft queue stats
    Queue(QueueArgs),
    /// Client: list and replay dead-lettered step messages.
    ///
    /// Example: weft dlq list
    Dlq(DlqArgs),
    /// Run the benchmark workloads (W0 to W7) against real orchestrator and
    /// worker processes; prints one JSON line per workload and a table.
    ///
    /// Example: weft bench --runs 3 > bench.out
    Bench(BenchArgs),
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
    /// Results applied per transaction. Smaller batches commit sooner (a
    /// retry that falls due waits for the batch in progress), larger ones
    /// apply more per second at saturation.
    #[arg(long, env = "WEFT_RESULT_BATCH", default_value_t = 50)]
    pub result_batch: i32,
    /// How long a result the batch statement hands to the decoder (not
    /// plainly well formed), or one read after a failed batch, stays hidden
    /// from other collectors. The usual batch holds row locks instead, which
    /// a dead orchestrator releases at once.
    #[arg(long, env = "WEFT_RESULT_LEASE", default_value = "30s", value_parser = duration)]
    pub result_lease: Duration,
    /// While results of independent tasks stream in, how long a batch of
    /// results may wait for more to apply in the same transaction; a result
    /// after a quiet spell, or whose waiting gathered nothing, goes at once
    /// (0ms: never wait).
    #[arg(long, env = "WEFT_BATCH_LINGER", default_value = "20ms", value_parser = duration)]
    pub batch_linger: Duration,
    /// Fallback poll interval when no notification arrives (jittered).
    #[arg(long, env = "WEFT_POLL_INTERVAL", default_value = "5s", value_parser = duration)]
    pub poll_interval: Duration,
    /// Run migrations at startup.
    #[arg(long, env = "WEFT_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// How often queue gauges (depth, in flight, oldest age) are refreshed for /metrics.
    #[arg(long, env = "WEFT_METRICS_INTERVAL", default_value = "15s", value_parser = duration)]
    pub metrics_interval: Duration,
    /// Delete finished tasks (and queue archives) older than this, hourly; unset keeps everything.
    #[arg(long, env = "WEFT_RETENTION", value_parser = duration)]
    pub retention: Option<Duration>,
    /// API authentication: `on` needs a bearer token on every /v1 route but
    /// /v1/openapi.json and refuses to start without tokens; `off` leaves the
    /// API open (for a loopback-only address).
    #[arg(long, env = "WEFT_AUTH", value_enum, default_value_t = AuthMode::On)]
    pub auth: AuthMode,
    /// File of API tokens, one `name:scope:sha256hex` per line (`#` comments);
    /// scope is read, write or admin. Hash a token with: printf %s "$TOKEN" | sha256sum
    #[arg(long, env = "WEFT_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<std::path::PathBuf>,
    /// API tokens as `name:scope:sha256hex` entries separated by `;`, in
    /// addition to those of the file.
    #[arg(long, env = "WEFT_AUTH_TOKENS", hide_env_values = true)]
    pub auth_tokens: Option<String>,
}

/// Whether the API asks for bearer tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    On,
    Off,
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
    /// How long a result may wait for its running siblings (messages of the
    /// same read) read within this long, to commit together (0ms: never wait).
    #[arg(long, env = "WEFT_COMPLETION_LINGER", default_value = "1ms", value_parser = duration)]
    pub completion_linger: Duration,
    /// While steps of independent tasks stream in, how long a read waits
    /// for more steps to take at once, and a batch of results for more to
    /// send in the same transaction; after a quiet spell, or once waiting
    /// gathered nothing, they go at once (0ms: never wait).
    #[arg(long, env = "WEFT_BATCH_LINGER", default_value = "20ms", value_parser = duration)]
    pub batch_linger: Duration,
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

/// Where a client command finds the API and how it prints. A value comes from
/// the flag, else its variable, else the config file, else the default.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Client options")]
pub struct ClientArgs {
    /// Base URL of the orchestrator's API [default: `api_url` from the config
    /// file, else http://127.0.0.1:8080].
    #[arg(long, env = "WEFT_API_URL", global = true)]
    pub api_url: Option<String>,
    /// Bearer token sent with every request [default: `token` from the config file].
    #[arg(long, env = "WEFT_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Output: aligned plain-text tables, or the API's JSON pretty-printed.
    #[arg(long, env = "WEFT_OUTPUT", value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,
    /// Client config file, JSON: {"api_url": "...", "token": "..."}
    /// [default: $HOME/.config/weft/client.json, ignored when missing].
    #[arg(long, env = "WEFT_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// The default config file, resolved here because only this module reads the environment.
    #[arg(skip = default_client_config())]
    pub default_config: Option<std::path::PathBuf>,
}

fn default_client_config() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(std::path::Path::new(&home).join(".config/weft/client.json"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TemplateCommand {
    /// Register template files (YAML or JSON); prints per file `created`,
    /// `unchanged`, `conflict` or `invalid`, and exits 1 if any file failed.
    ///
    /// Example: weft template apply examples/diamond.yaml examples/chain.yaml
    Apply {
        /// Template files.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// List registered templates.
    ///
    /// Example: weft template list --namespace demo
    List {
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Show one registered template version, with its defaults resolved.
    ///
    /// Example: weft template show demo/diamond@1
    Show {
        /// The template version.
        #[arg(value_name = "NAMESPACE/NAME@VERSION")]
        template: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TaskCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TaskCommand {
    /// Create a task from a template (the latest version unless @VERSION is given).
    ///
    /// With --wait, prints each step's state changes until the task ends, then
    /// the outputs; the exit status is 0 when it completed, 1 when it ended in
    /// error (or the command failed), 2 when it was cancelled.
    ///
    /// Example: weft task create demo/diamond --input '{"order":7}' --wait
    Create {
        /// The template: its latest version, or the one named after `@`.
        #[arg(value_name = "NAMESPACE/NAME[@VERSION]")]
        template: String,
        /// The task's input: JSON, @FILE to read it from a file, or @- for stdin.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Creating again with the same key returns the existing task.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Higher runs first.
        #[arg(long)]
        priority: Option<i32>,
        /// Watch the task until it ends; the exit status tells how it ended.
        #[arg(long)]
        wait: bool,
    },
    /// Show a task and its steps.
    ///
    /// Example: weft task get 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11
    Get {
        /// Task id.
        id: String,
    },
    /// List tasks, newest first; prints the cursor of the next page.
    ///
    /// Example: weft task list --namespace demo --state error --limit 20
    List {
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only this template name.
        #[arg(long)]
        name: Option<String>,
        /// Only this state (pending, running, complete, error, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Tasks per page (1 to 500) [default: 50].
        #[arg(long)]
        limit: Option<i64>,
        /// Continue after this cursor, as printed by the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel a task: its waiting steps are cancelled, queued messages withdrawn,
    /// and results that arrive later are discarded.
    ///
    /// Example: weft task cancel 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11 --reason "duplicate order"
    Cancel {
        /// Task id.
        id: String,
        /// Recorded in the task's history.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Explain why a task is in its status: what blocks it, what is ready, which retries are due.
    ///
    /// Example: weft task explain 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11
    Explain {
        /// Task id.
        id: String,
    },
    /// Show every state change of a task and its steps, oldest first.
    ///
    /// Example: weft task history 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11
    History {
        /// Task id.
        id: String,
    },
    /// Run a failed step again, with a fresh budget of attempts.
    ///
    /// Example: weft task retry-step 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11 charge
    RetryStep {
        /// Task id.
        id: String,
        /// Step name.
        step: String,
    },
    /// Mark a failed step resolved by hand, optionally with the output its dependents receive.
    ///
    /// Example: weft task resolve-step 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11 charge --step-output '{"charged":true}'
    ResolveStep {
        /// Task id.
        id: String,
        /// Step name.
        step: String,
        /// The output its dependents receive: JSON, @FILE or @- for stdin.
        /// (Named apart from `--output`, which picks the output format.)
        #[arg(long)]
        step_output: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: QueueCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum QueueCommand {
    /// Per queue: messages waiting, messages in flight, age of the oldest message.
    ///
    /// Example: weft queue stats --output json
    Stats,
}

#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered step messages, newest first.
    ///
    /// Example: weft dlq list --limit 20
    List {
        /// Most entries shown (1 to 500) [default: 100].
        #[arg(long)]
        limit: Option<i64>,
    },
    /// Run a dead-lettered step again, as a new attempt, and drop the dead letter.
    ///
    /// Example: weft dlq replay weft_dlq_demo:42
    Replay {
        /// Dead letter id, as `weft dlq list` prints it.
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Finished more than this long ago.
    #[arg(long, value_parser = duration)]
    pub older_than: Duration,
    /// Rows deleted per transaction.
    #[arg(long, env = "WEFT_PRUNE_BATCH", default_value_t = 500)]
    pub batch_size: i32,
}

/// `weft bench`: the benchmark workloads of `docs/benchmarks.md` (W0 to W7).
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Use this PostgreSQL server instead of starting the private benchmark
    /// cluster: each workload gets its own database on it, named after the
    /// database of this URL (`<name>_w1_stream_1w`, ...).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Port of the private benchmark cluster (started with default durability).
    #[arg(long, env = "WEFT_BENCH_PG_PORT", default_value_t = 55450)]
    pub pg_port: u16,
    /// Workloads to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "W0,W1,W2,W3,W4,W5,W6,W7")]
    pub workloads: Vec<String>,
    /// Runs of every workload; figures are medians across runs, percentiles
    /// come from the samples of all runs.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Tiny sizes: every workload in about a minute, for a quick check.
    #[arg(long)]
    pub smoke: bool,
    /// Multiplies every workload's size (tasks, steps, width).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// W5's submission rates in tasks/s, tried in order until one falls
    /// behind [default: 200,300,400,500,600,800,1000,1250,1500,2000, then
    /// 150,100,50 downwards when 200 already falls behind].
    #[arg(long, value_delimiter = ',')]
    pub w5_rates: Option<Vec<u32>>,
    /// W7's idle period in seconds [default: 60; 5 with --smoke].
    #[arg(long)]
    pub w7_secs: Option<u64>,
    /// Handlers each worker process runs at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Extra flag for every orchestrator process (repeatable), e.g.
    /// `--orchestrator-arg=--result-batch=200`.
    #[arg(long = "orchestrator-arg", allow_hyphen_values = true)]
    pub orchestrator_args: Vec<String>,
    /// Extra flag for every worker process (repeatable).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// The `weft` binary whose orchestrator and worker processes are measured
    /// [default: this executable].
    #[arg(long)]
    pub weft_bin: Option<std::path::PathBuf>,
    /// `RUST_LOG` of the orchestrator and worker processes.
    #[arg(long, default_value = "warn")]
    pub child_log: String,
    /// Keep the per-workload databases afterwards (for EXPLAIN and inspection).
    #[arg(long)]
    pub keep_databases: bool,
    /// `NAME=VALUE`: set on every workload database before its processes
    /// connect (repeatable), to profile or compare configurations, e.g.
    /// `--db-setting session_preload_libraries=auto_explain`.
    #[arg(long = "db-setting")]
    pub db_settings: Vec<String>,
    /// Run even when the cluster does not commit durably (fsync or
    /// synchronous_commit off); figures are then not comparable.
    #[arg(long)]
    pub allow_nondurable: bool,
}
