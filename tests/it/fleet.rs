//! Running Weft for tests: in-process orchestrators and workers, real `weft`
//! processes, and helpers to create tasks and wait for them.

use std::process::Stdio;
use std::time::Duration;

use orchestrator::store::{self, StepRow};
use orchestrator::tasks::{self, CreateTask};
use serde_json::Value;
use shared::template::Template;
use shared::{Namespace, TaskId, TaskState};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support;

/// Orchestrators and workers running inside the test process.
pub struct Fleet {
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Short intervals so tests never wait on a fallback poll for long.
pub fn orchestrator_config() -> orchestrator::OrchestratorConfig {
    orchestrator::OrchestratorConfig {
        http_addr: None,
        auth: orchestrator::Auth::Off,
        collectors: 2,
        collector: orchestrator::CollectorConfig {
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(5),
            ..Default::default()
        },
        scheduler: orchestrator::SchedulerConfig {
            poll_interval: Duration::from_millis(500),
            ..Default::default()
        },
        metrics_interval: Duration::from_millis(500),
        pruner: Default::default(),
    }
}

pub fn worker_config(namespace: &str) -> worker::WorkerConfig {
    let mut config = worker::WorkerConfig::new(Namespace::parse(namespace).unwrap());
    config.concurrency = 32;
    config.poll_interval = Duration::from_millis(500);
    config.lease = Duration::from_secs(5);
    config.heartbeat = Duration::from_secs(1);
    config
}

/// A pool of its own for one in-process orchestrator or worker, on the same
/// database, as each process has in production: their loops hold
/// connections, so sharing the test's pool would starve it.
pub fn own_pool(pool: &PgPool) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy_with((*pool.connect_options()).clone())
}

impl Fleet {
    /// Starts `orchestrators` orchestrators and one worker per namespace.
    pub fn start(pool: &PgPool, orchestrators: usize, namespaces: &[&str]) -> Fleet {
        let orchestrators = (0..orchestrators).map(|_| orchestrator_config()).collect();
        let workers = namespaces.iter().map(|ns| worker_config(ns)).collect();
        Self::start_with(pool, orchestrators, workers)
    }

    /// Starts one orchestrator and one worker per configuration.
    pub fn start_with(
        pool: &PgPool,
        orchestrators: Vec<orchestrator::OrchestratorConfig>,
        workers: Vec<worker::WorkerConfig>,
    ) -> Fleet {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        for config in orchestrators {
            let (pool, stop) = (own_pool(pool), shutdown.clone());
            tracker.spawn(async move { orchestrator::run(config, pool, stop).await.unwrap() });
        }
        for config in workers {
            let worker = worker::Worker::builder(config).build();
            let (pool, stop) = (own_pool(pool), shutdown.clone());
            tracker.spawn(async move { worker.run(pool, stop).await.unwrap() });
        }
        Fleet { shutdown, tracker }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Registers a template from YAML.
pub async fn register(pool: &PgPool, yaml: &str) -> Template {
    let template = Template::parse(yaml).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    store::register_template(&mut conn, &template)
        .await
        .unwrap();
    template
}

pub async fn create(pool: &PgPool, namespace: &str, name: &str, input: Value) -> TaskId {
    tasks::create_task(
        pool,
        &Default::default(),
        CreateTask {
            namespace: namespace.into(),
            name: name.into(),
            version: None,
            input,
            priority: 0,
            idempotency_key_hash: None,
            request_hash: None,
        },
    )
    .await
    .unwrap()
    .id()
}

pub async fn task_state(pool: &PgPool, id: TaskId) -> TaskState {
    store::get_task(pool, id).await.unwrap().unwrap().state
}

/// Waits until the task is in a final state and returns it.
pub async fn wait_final(pool: &PgPool, id: TaskId, deadline: Duration) -> TaskState {
    let finished = support::wait_until(deadline, || async {
        task_state(pool, id).await.is_terminal()
    })
    .await;
    let state = task_state(pool, id).await;
    assert!(
        finished,
        "task {id} still {state} after {deadline:?}; steps: {:#?}",
        steps(pool, id).await
    );
    state
}

/// Waits until no task of the database is pending or running.
pub async fn wait_all_final(pool: &PgPool, deadline: Duration) {
    let done = support::wait_until(deadline, || async {
        let open: i64 = sqlx::query_scalar(
            "select count(*) from weft.tasks where state in ('pending', 'running')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        open == 0
    })
    .await;
    let states: Vec<(String, i64)> =
        sqlx::query_as("select state, count(*) from weft.tasks group by state order by 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(done, "tasks still open after {deadline:?}: {states:?}");
}

pub async fn steps(pool: &PgPool, id: TaskId) -> Vec<StepRow> {
    store::get_steps(pool, id).await.unwrap()
}

pub fn step<'a>(steps: &'a [StepRow], name: &str) -> &'a StepRow {
    steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
}

/// Checks the books of the whole database: what must hold whatever ran.
/// - no step was enqueued before each of its dependencies completed;
/// - every attempt was enqueued exactly once and has at most one applied result;
/// - every complete task has every step complete (with exactly one success) or resolved.
pub async fn check_books(pool: &PgPool) {
    let early: i64 = sqlx::query_scalar(
        "select count(*) from weft.step_transitions enq
         join weft.step_edges e on e.step_id = enq.step_id
         where enq.to_state = 'enqueued'
           and not exists (select 1 from weft.step_transitions done
                           where done.step_id = e.depends_on and done.to_state in ('complete', 'resolved')
                             and done.at <= enq.at)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        early, 0,
        "steps enqueued before their dependencies completed"
    );
    let bad_attempts: i64 = sqlx::query_scalar(
        "select count(*) from weft.steps s
         where s.attempts <> (select count(*) from weft.step_transitions t
                              where t.step_id = s.id and t.to_state = 'enqueued')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(bad_attempts, 0, "every attempt is enqueued exactly once");
    let double: i64 = sqlx::query_scalar(
        "select count(*) from (select step_id, attempt from weft.step_transitions
                               where from_state = 'enqueued' group by 1, 2 having count(*) > 1) d",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(double, 0, "an attempt has two applied results");
    let incomplete: i64 = sqlx::query_scalar(
        "select count(*) from weft.tasks t join weft.steps s on s.task_id = t.id
         where t.state = 'complete'
           and (s.state not in ('complete', 'resolved')
                or (s.state = 'complete'
                    and (select count(*) from weft.step_transitions x
                         where x.step_id = s.id and x.to_state = 'complete') <> 1))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        incomplete, 0,
        "a complete task has a step without exactly one success"
    );
}

/// A `weft` process. Killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(args: &[&str], database_url: &str) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            // Test defaults as environment, so a test's flags override them.
            .env("WEFT_POLL_INTERVAL", "500ms")
            .env("WEFT_LEASE", "5s")
            .env("WEFT_RESULT_LEASE", "5s")
            .env("WEFT_MIGRATE", "false")
            .env("WEFT_AUTH", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn weft");
        Proc { child }
    }

    pub fn orchestrator(database_url: &str) -> Proc {
        let addr = format!("127.0.0.1:{}", free_port());
        Proc::spawn(&["orchestrator", "--http-addr", &addr], database_url)
    }

    pub fn worker(database_url: &str, namespace: &str, extra: &[&str]) -> Proc {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["worker", "--namespace", namespace, "--http-addr", &addr];
        args.extend_from_slice(extra);
        Proc::spawn(&args, database_url)
    }

    /// Sends a signal (SIGTERM, SIGKILL) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("process still running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn wait(&mut self, deadline: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .expect("process did not exit in time")
            .unwrap()
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
