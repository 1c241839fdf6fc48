//! One workload run's world: a fresh database, an orchestrator process and
//! worker processes on it, a pool for the benchmark's own queries, and the
//! HTTP calls a client makes.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::Measured;
use super::procs::{Launcher, Proc, stop_all};
use super::server::{Server, connect};

/// Bench-only instrumentation, installed in a workload's database when it
/// needs instants Weft does not store. Each adds one row insert to the
/// transaction it observes and changes nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instrument {
    None,
    /// `bench.results`: every result message as a worker sends it, with the
    /// handler's `started_at` (the worker's clock just before the handler
    /// is called) and the clock when the message was inserted. Its `xmin`
    /// is the worker's transaction, so with `track_commit_timestamp` the
    /// commit time of a result is `pg_xact_commit_timestamp(xmin)`. One
    /// statement-level trigger call per batch of results a worker commits.
    Results,
    /// `bench.retry_due`: for every attempt that went to `waiting_retry`,
    /// the `next_attempt_at` the engine chose (random with full jitter, so
    /// it cannot be recomputed afterwards). A row trigger whose WHEN clause
    /// leaves every other transition alone.
    RetryDue,
}

impl Instrument {
    fn sql(self) -> &'static str {
        match self {
            Instrument::None => "",
            Instrument::Results => RESULTS,
            Instrument::RetryDue => RETRY_DUE,
        }
    }
}

const RESULTS: &str = "
create schema bench;
create table bench.results (
    step_id uuid not null,
    attempt integer not null,
    status text not null,
    started_at timestamptz,
    finished_at timestamptz,
    sent_at timestamptz not null
);
create function bench.log_results() returns trigger language plpgsql as $$
begin
    insert into bench.results (step_id, attempt, status, started_at, finished_at, sent_at)
    select (n.message ->> 'step_id')::uuid, (n.message ->> 'attempt')::int, n.message ->> 'status',
           (n.message ->> 'started_at')::timestamptz, (n.message ->> 'finished_at')::timestamptz,
           clock_timestamp()
    from new_rows n;
    return null;
end
$$;
create trigger bench_log_results after insert on pgmq.q_weft_results
    referencing new table as new_rows for each statement execute function bench.log_results();
";

const RETRY_DUE: &str = "
create schema bench;
create table bench.retry_due (step_id uuid not null, attempt integer not null, due timestamptz not null);
create function bench.log_retry_due() returns trigger language plpgsql as $$
begin
    insert into bench.retry_due (step_id, attempt, due)
    select new.step_id, new.attempt, s.next_attempt_at from weft.steps s where s.id = new.step_id;
    return null;
end
$$;
create trigger bench_log_retry_due after insert on weft.step_transitions
    for each row when (new.to_state = 'waiting_retry') execute function bench.log_retry_due();
";

/// The processes and database of one workload run.
pub struct Fleet<'a> {
    server: &'a Server,
    launcher: &'a Launcher,
    keep: bool,
    pub db: String,
    pub url: String,
    /// The benchmark's own connections (never the measured processes').
    pub pool: PgPool,
    pub api: String,
    pub http: reqwest::Client,
    orchestrator: Option<Proc>,
    workers: Vec<Proc>,
}

impl<'a> Fleet<'a> {
    /// A fresh database `<base>_<suffix>` (instrumented when asked) with
    /// the templates registered, an orchestrator and `workers` worker processes.
    pub async fn start(
        server: &'a Server,
        launcher: &'a Launcher,
        keep: bool,
        suffix: &str,
        templates: &[Value],
        workers: usize,
        instrument: Instrument,
    ) -> anyhow::Result<Fleet<'a>> {
        let (db, url) = server.fresh(suffix).await?;
        let pool = connect(&url, 4).await?;
        if instrument != Instrument::None {
            sqlx::raw_sql(instrument.sql()).execute(&pool).await?;
        }
        // Before the workers start, so their namespace's queue exists.
        register(&pool, templates).await?;
        let orchestrator = launcher
            .orchestrator(&url, &format!("weft-bench-{suffix}-orch"))
            .await?;
        let api = orchestrator.base_url();
        let mut fleet = Fleet {
            server,
            launcher,
            keep,
            db,
            url,
            pool,
            api,
            http: reqwest::Client::new(),
            orchestrator: Some(orchestrator),
            workers: Vec::new(),
        };
        fleet.add_workers(workers).await?;
        Ok(fleet)
    }

    pub async fn add_workers(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let name = format!("weft-bench-{}-worker{}", self.db, self.workers.len() + 1);
            self.workers
                .push(self.launcher.worker(&self.url, &name).await?);
        }
        Ok(())
    }

    /// Stops the processes, records their peak memory in `out`, and drops
    /// the database unless kept.
    pub async fn stop(mut self, out: &mut Measured) -> anyhow::Result<()> {
        let mut procs: Vec<Proc> = self.workers.drain(..).collect();
        procs.extend(self.orchestrator.take());
        for (role, usage) in stop_all(procs).await? {
            out.memory(role, usage.peak_rss_kib);
        }
        self.pool.close().await;
        if !self.keep {
            self.server.drop_database(&self.db).await?;
        }
        Ok(())
    }

    /// `POST /v1/tasks`: one task; returns its id.
    pub async fn create(&self, name: &str, input: Value) -> anyhow::Result<Uuid> {
        create_one(&self.http, &self.api, name, input).await
    }

    /// Creates `n` tasks of `name` one `POST /v1/tasks` at a time, as a
    /// client program's thread would: on a runtime of its own, on a thread
    /// of its own, so a request and its answer stay on one thread. (On the
    /// benchmark's shared runtime each call hopped between threads, about
    /// seven context switches per call where a client pays two.) Returns
    /// each call's duration.
    pub async fn stream(&self, name: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
        let (api, name) = (self.api.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the producer's runtime")?;
            runtime.block_on(async {
                let http = reqwest::Client::new();
                let mut took = Vec::with_capacity(n);
                for i in 0..n {
                    let t = Instant::now();
                    create_one(&http, &api, &name, json!({ "i": i })).await?;
                    took.push(t.elapsed());
                }
                Ok(took)
            })
        })
        .await
        .context("the producer's thread failed")?
    }

    /// `POST /v1/tasks/batch`, 1,000 tasks per call at most.
    pub async fn create_many(&self, name: &str, n: usize) -> anyhow::Result<Vec<Uuid>> {
        let mut ids = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let chunk = (n - i).min(1000);
            ids.extend(create_batch(&self.http, &self.api, name, i, chunk).await?);
            i += chunk;
        }
        Ok(ids)
    }

    /// Waits until the task is final; fails after `timeout` or when it did not complete.
    pub async fn wait_task(&self, id: Uuid, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let state: String = sqlx::query_scalar("select state from weft.tasks where id = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
            match state.as_str() {
                "complete" => return Ok(()),
                "error" | "cancelled" => bail!("task {id} ended {state}"),
                _ => {}
            }
            if start.elapsed() > timeout {
                bail!("task {id} still {state} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no task is pending or running; false after `timeout`.
    pub async fn wait_all(&self, timeout: Duration) -> anyhow::Result<bool> {
        let start = Instant::now();
        loop {
            let open: i64 = sqlx::query_scalar(
                "select count(*) from weft.tasks where state in ('pending', 'running')",
            )
            .fetch_one(&self.pool)
            .await?;
            if open == 0 {
                return Ok(true);
            }
            if start.elapsed() > timeout {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Tasks per state.
    pub async fn task_states(&self) -> anyhow::Result<Value> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select state, count(*) from weft.tasks group by 1 order by 1")
                .fetch_all(&self.pool)
                .await?;
        Ok(Value::Object(
            rows.into_iter().map(|(s, n)| (s, json!(n))).collect(),
        ))
    }

    pub async fn completed(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("select count(*) from weft.tasks where state = 'complete'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// When the last task finished (by the database's clock).
    pub async fn last_finished(&self) -> anyhow::Result<DateTime<Utc>> {
        let at: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
            "select max({}) from weft.tasks t
             left join weft.task_transitions tt on tt.task_id = t.id and tt.to_state = t.state",
            self.committed("tt", "t.finished_at")
        ))
        .fetch_one(&self.pool)
        .await?;
        at.context("no task finished")
    }

    /// The instant a row's transaction committed: its commit timestamp when
    /// the server records them, else `fallback` (a clock read inside that
    /// transaction, just before it committed).
    pub fn committed(&self, alias: &str, fallback: &str) -> String {
        if self.server.commit_ts {
            format!("coalesce(pg_xact_commit_timestamp({alias}.xmin), {fallback})")
        } else {
            fallback.to_owned()
        }
    }

    /// Per dependent step of the given tasks (all when `None`), in ms:
    /// `hop` = handler start − commit of the result that made it ready (its
    /// last dependency's), split into `hop_orchestrator` (that commit → the
    /// commit that enqueued the step) and `hop_worker` (→ handler start);
    /// `hop_cc` = its `complete` transition − its last dependency's.
    pub async fn hops(&self, tasks: Option<&[Uuid]>, out: &mut Measured) -> anyhow::Result<()> {
        let sql = format!(
            "with res as (
                 select r.step_id, r.started_at, {res_commit} as committed_at
                 from bench.results r where r.status = 'success'
             ),
             enq as (
                 select t.step_id, {enq_commit} as enqueued_at
                 from weft.step_transitions t where t.to_state = 'enqueued' and t.attempt = 1
             ),
             done as (
                 select t.step_id, t.at as complete_at
                 from weft.step_transitions t where t.to_state = 'complete'
             ),
             hop as (
                 select e.step_id, max(rd.committed_at) as dep_committed, max(dd.complete_at) as dep_complete
                 from weft.step_edges e
                 join res rd on rd.step_id = e.depends_on
                 join done dd on dd.step_id = e.depends_on
                 where $1::uuid[] is null or e.task_id = any($1)
                 group by e.step_id
             )
             select (extract(epoch from rs.started_at - h.dep_committed) * 1000)::float8,
                    (extract(epoch from q.enqueued_at - h.dep_committed) * 1000)::float8,
                    (extract(epoch from rs.started_at - q.enqueued_at) * 1000)::float8,
                    (extract(epoch from d.complete_at - h.dep_complete) * 1000)::float8
             from hop h
             join res rs on rs.step_id = h.step_id
             join enq q on q.step_id = h.step_id
             join done d on d.step_id = h.step_id",
            res_commit = self.committed("r", "r.sent_at"),
            enq_commit = self.committed("t", "t.at"),
        );
        let rows: Vec<(f64, f64, f64, f64)> = sqlx::query_as(&sql)
            .bind(tasks)
            .fetch_all(&self.pool)
            .await?;
        for (hop, orch, worker, cc) in rows {
            out.sample("hop", hop);
            out.sample("hop_orchestrator", orch);
            out.sample("hop_worker", worker);
            out.sample("hop_cc", cc);
        }
        Ok(())
    }

    /// Task end to end, in ms: created (the creating transaction's start)
    /// → the commit that completed it.
    pub async fn end_to_end(&self, tasks: &[Uuid], out: &mut Measured) -> anyhow::Result<()> {
        let sql = format!(
            "select (extract(epoch from {} - t.created_at) * 1000)::float8
             from weft.tasks t
             join weft.task_transitions tt on tt.task_id = t.id and tt.to_state = 'complete'
             where t.id = any($1)",
            self.committed("tt", "t.finished_at")
        );
        let rows: Vec<f64> = sqlx::query_scalar(&sql)
            .bind(tasks)
            .fetch_all(&self.pool)
            .await?;
        for ms in rows {
            out.sample("e2e", ms);
        }
        Ok(())
    }

    /// `weft.check_invariants('0 seconds')`: total violations, and the
    /// violated invariants.
    pub async fn invariant_violations(&self) -> anyhow::Result<(i64, Value)> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "select invariant, violations from weft.check_invariants('0 seconds') where violations > 0",
        )
        .fetch_all(&self.pool)
        .await?;
        let total = rows.iter().map(|(_, n)| n).sum();
        Ok((
            total,
            Value::Object(rows.into_iter().map(|(i, n)| (i, json!(n))).collect()),
        ))
    }
}

/// Registers templates (JSON) the way `POST /v1/templates` does.
pub async fn register(pool: &PgPool, templates: &[Value]) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    for template in templates {
        let template = shared::template::Template::from_json(template)
            .map_err(|e| anyhow::anyhow!("a benchmark template is invalid: {e}"))?;
        orchestrator::store::register_template(&mut conn, &template).await?;
    }
    Ok(())
}

pub async fn create_one(
    http: &reqwest::Client,
    api: &str,
    name: &str,
    input: Value,
) -> anyhow::Result<Uuid> {
    let response = http
        .post(format!("{api}/v1/tasks"))
        .json(&json!({ "namespace": super::workloads::NAMESPACE, "name": name, "input": input }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST /v1/tasks failed ({status}): {body}");
    }
    body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("POST /v1/tasks returned no id")
}

pub async fn create_batch(
    http: &reqwest::Client,
    api: &str,
    name: &str,
    first: usize,
    n: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let tasks: Vec<Value> = (first..first + n)
        .map(|i| json!({ "namespace": super::workloads::NAMESPACE, "name": name, "input": { "i": i } }))
        .collect();
    let response = http
        .post(format!("{api}/v1/tasks/batch"))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST /v1/tasks/batch failed ({status}): {body}");
    }
    body["tasks"]
        .as_array()
        .context("POST /v1/tasks/batch returned no tasks")?
        .iter()
        .map(|t| {
            t["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .context("a batch item without id")
        })
        .collect()
}
