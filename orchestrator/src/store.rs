//! The orchestrator's SQL layer: every statement it runs, as functions named
//! by intent that take `impl PgExecutor` (or a connection, when they run
//! several statements) so callers compose them in one transaction. Loops and
//! HTTP handlers contain no SQL text.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use shared::names::StepName;
use shared::template::Template;
use shared::{ExecutionStatus, Namespace, StepState, TaskId, TaskState};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "template {namespace}/{name}@{version} exists with different content; register a new version"
    )]
    TemplateConflict {
        namespace: String,
        name: String,
        version: i32,
    },
    #[error("template {0} not found")]
    TemplateNotFound(String),
    #[error("template {0} kept getting new versions while the tasks were created; try again")]
    TemplateChanging(String),
    #[error("stored template {id} is unreadable: {message}")]
    CorruptTemplate { id: i64, message: String },
    #[error("idempotency key was already used with a different request")]
    IdempotencyConflict,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A registered template.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TemplateRecord {
    pub id: i64,
    pub namespace: String,
    pub name: String,
    pub version: i32,
    pub definition: Value,
    pub created_at: DateTime<Utc>,
}

/// What registering a template did.
#[derive(Debug, Clone)]
pub enum Registered {
    Created(TemplateRecord),
    Unchanged(TemplateRecord),
}

/// Registers a template (and its namespace and queues). Templates are
/// immutable: the same content again is a no-op, different content under the
/// same version is refused.
pub async fn register_template(
    conn: &mut PgConnection,
    template: &Template,
) -> Result<Registered, StoreError> {
    let definition = template.definition();
    sqlx::query("select weft.ensure_namespace($1)")
        .bind(template.namespace.as_str())
        .execute(&mut *conn)
        .await?;
    let created: Option<TemplateRecord> = sqlx::query_as(
        "insert into weft.templates (namespace, name, version, definition) values ($1, $2, $3, $4)
         on conflict (namespace, name, version) do nothing
         returning id, namespace, name, version, definition, created_at",
    )
    .bind(template.namespace.as_str())
    .bind(template.name.as_str())
    .bind(template.version)
    .bind(&definition)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(record) = created {
        return Ok(Registered::Created(record));
    }
    let existing: TemplateRecord = sqlx::query_as(
        "select id, namespace, name, version, definition, created_at from weft.templates
         where namespace = $1 and name = $2 and version = $3",
    )
    .bind(template.namespace.as_str())
    .bind(template.name.as_str())
    .bind(template.version)
    .fetch_one(&mut *conn)
    .await?;
    if existing.definition == definition {
        Ok(Registered::Unchanged(existing))
    } else {
        Err(StoreError::TemplateConflict {
            namespace: existing.namespace,
            name: existing.name,
            version: existing.version,
        })
    }
}

/// Lists templates, newest version first within each name.
pub async fn list_templates(
    executor: impl PgExecutor<'_>,
    namespace: Option<&str>,
) -> Result<Vec<TemplateRecord>, StoreError> {
    Ok(sqlx::query_as(
        "select id, namespace, name, version, definition, created_at from weft.templates
         where $1::text is null or namespace = $1
         order by namespace, name, version desc",
    )
    .bind(namespace)
    .fetch_all(executor)
    .await?)
}

/// Finds a template by name, at a version or the latest one.
pub async fn find_template(
    executor: impl PgExecutor<'_>,
    namespace: &str,
    name: &str,
    version: Option<i32>,
) -> Result<TemplateRecord, StoreError> {
    let found: Option<TemplateRecord> = sqlx::query_as(
        "select id, namespace, name, version, definition, created_at from weft.templates
         where namespace = $1 and name = $2 and ($3::int is null or version = $3)
         order by version desc limit 1",
    )
    .bind(namespace)
    .bind(name)
    .bind(version)
    .fetch_optional(executor)
    .await?;
    found.ok_or_else(|| {
        StoreError::TemplateNotFound(match version {
            Some(v) => format!("{namespace}/{name}@{v}"),
            None => format!("{namespace}/{name}"),
        })
    })
}

/// A task to create from a resolved template.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: TaskId,
    pub template_id: i64,
    pub input: Value,
    pub priority: i32,
    pub idempotency_key_hash: Option<String>,
    pub request_hash: Option<String>,
    pub trace_context: Option<Value>,
}

/// What [`create_tasks`] did.
#[derive(Debug, Clone, Deserialize)]
pub struct CreatedTasks {
    /// Nothing was written: the latest version was asked for and the
    /// template given is no longer it.
    #[serde(default)]
    pub stale: bool,
    /// The tasks inserted; a task whose idempotency key was already taken
    /// is not among them.
    #[serde(default)]
    pub inserted: Vec<TaskId>,
    /// Their root steps, enqueued.
    #[serde(default)]
    pub enqueued: Vec<Enqueued>,
    /// When the tasks were created (the transaction's start, the column's
    /// default) and when they started and their roots were enqueued.
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
    /// The view of the one task inserted, when asked for and exactly one was.
    #[serde(skip)]
    pub view: Option<TaskView>,
}

/// Inserts tasks of one template with their steps and edges and enqueues
/// their root steps, in one statement (`weft.create_tasks`): one round trip
/// whatever the number of tasks, atomic on its own. Tasks whose idempotency
/// key is already taken are skipped and left out of `inserted`, so the
/// caller can return the existing task. With `view`, a task created alone
/// comes back as [`task_view`] would read it in the same transaction, built
/// from what the statement wrote (no read). With `latest` (the request named no
/// version), nothing is written and `stale` comes back when a newer version
/// of the template than `template` exists.
pub async fn create_tasks(
    executor: impl PgExecutor<'_>,
    template: &Template,
    tasks: &[NewTask],
    latest: bool,
    view: bool,
) -> Result<CreatedTasks, StoreError> {
    let mut task_ids = Vec::with_capacity(tasks.len());
    let mut template_ids = Vec::with_capacity(tasks.len());
    let mut inputs = Vec::with_capacity(tasks.len());
    let mut priorities = Vec::with_capacity(tasks.len());
    let mut key_hashes = Vec::with_capacity(tasks.len());
    let mut request_hashes = Vec::with_capacity(tasks.len());
    let mut traces = Vec::with_capacity(tasks.len());
    for task in tasks {
        task_ids.push(task.id.0);
        template_ids.push(task.template_id);
        inputs.push(task.input.clone());
        priorities.push(task.priority);
        key_hashes.push(task.idempotency_key_hash.clone());
        request_hashes.push(task.request_hash.clone());
        traces.push(task.trace_context.clone());
    }

    // Steps: ids are generated here so edges can name them.
    let by_name = step_positions(template);
    let n = template.steps.len() * tasks.len();
    let mut step_task = Vec::with_capacity(n);
    let mut step_task_idx = Vec::with_capacity(n);
    let mut step_ids = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    let mut handlers = Vec::with_capacity(n);
    let mut configs = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut timeouts = Vec::with_capacity(n);
    let mut initials = Vec::with_capacity(n);
    let mut maxes = Vec::with_capacity(n);
    let mut multipliers = Vec::with_capacity(n);
    let mut jitters = Vec::with_capacity(n);
    let mut edge_task = Vec::new();
    let mut edge_step = Vec::new();
    let mut edge_dep = Vec::new();
    for (task_idx, task_id) in task_ids.iter().enumerate() {
        let ids: Vec<Uuid> = (0..template.steps.len()).map(|_| Uuid::now_v7()).collect();
        for (position, step) in template.steps.iter().enumerate() {
            step_task.push(*task_id);
            step_task_idx.push(i32::try_from(task_idx + 1).unwrap_or(i32::MAX));
            step_ids.push(ids[position]);
            positions.push(position as i32);
            names.push(step.name.as_str().to_owned());
            handlers.push(step.handler.as_str().to_owned());
            configs.push(step.config.clone());
            max_attempts.push(step.retry.max_attempts as i32);
            timeouts.push(millis_i32(step.timeout));
            initials.push(millis_i32(step.retry.backoff.initial));
            maxes.push(millis_i32(step.retry.backoff.max));
            multipliers.push(step.retry.backoff.multiplier);
            jitters.push(step.retry.backoff.jitter.as_str().to_owned());
            for dep in &step.depends_on {
                if let Some(&dep_position) = by_name.get(dep) {
                    edge_task.push(*task_id);
                    edge_step.push(ids[position]);
                    edge_dep.push(ids[dep_position]);
                }
            }
        }
    }
    let sql = "select weft.create_tasks($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                                        $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24,
                                        $25, $26)";
    let sqlx::types::Json(mut created): sqlx::types::Json<CreatedTasks> = sqlx::query_scalar(sql)
        .bind(template.namespace.as_str())
        .bind(template.on_failure.as_str())
        .bind(latest)
        .bind(&task_ids)
        .bind(&template_ids)
        .bind(&inputs)
        .bind(&priorities)
        .bind(&key_hashes)
        .bind(&request_hashes)
        .bind(&traces)
        .bind(&step_ids)
        .bind(&step_task)
        .bind(&step_task_idx)
        .bind(&positions)
        .bind(&names)
        .bind(&handlers)
        .bind(&configs)
        .bind(&max_attempts)
        .bind(&timeouts)
        .bind(&initials)
        .bind(&maxes)
        .bind(&multipliers)
        .bind(&jitters)
        .bind(&edge_task)
        .bind(&edge_step)
        .bind(&edge_dep)
        .fetch_one(executor)
        .await?;
    if view
        && let ([task], [id]) = (tasks, created.inserted.as_slice())
        && task.id == *id
    {
        created.view = created_view(template, &by_name, task, &step_ids, &created);
    }
    Ok(created)
}

/// The view of a task just created by [`create_tasks`], from what it wrote:
/// the task `running` (`processing`: its roots are in flight), its roots
/// `enqueued` at their first attempt, every other step `pending` and not
/// ready (a dependency of each is not done). As `weft.task_view` reads it
/// in the creating transaction (tests/it/api.rs compares the two). `None`
/// when the statement did not say when it ran.
fn created_view(
    template: &Template,
    positions: &HashMap<&StepName, usize>,
    task: &NewTask,
    step_ids: &[Uuid],
    created: &CreatedTasks,
) -> Option<TaskView> {
    let (created_at, at) = (created.created_at?, created.at?);
    let roots: HashSet<Uuid> = created.enqueued.iter().map(|e| e.step_id).collect();
    let steps = template
        .steps
        .iter()
        .zip(step_ids)
        .map(|(step, id)| {
            let enqueued = roots.contains(id);
            let mut depends_on: Vec<_> = step.depends_on.iter().collect();
            depends_on.sort_by_key(|name| positions.get(name));
            StepRow {
                id: *id,
                name: step.name.as_str().to_owned(),
                handler: step.handler.as_str().to_owned(),
                state: if enqueued {
                    StepState::Enqueued
                } else {
                    StepState::Pending
                },
                attempts: i32::from(enqueued),
                max_attempts: step.retry.max_attempts as i32,
                depends_on: depends_on.iter().map(|n| n.as_str().to_owned()).collect(),
                ready: false,
                output: None,
                last_error: None,
                next_attempt_at: None,
                enqueued_at: enqueued.then_some(at),
                finished_at: None,
            }
        })
        .collect();
    Some(TaskView {
        task: TaskRow {
            id: task.id.0,
            namespace: template.namespace.as_str().to_owned(),
            template_name: template.name.as_str().to_owned(),
            template_version: template.version,
            state: TaskState::Running,
            execution_status: Some(ExecutionStatus::Processing),
            on_failure: template.on_failure.as_str().to_owned(),
            input: task.input.clone(),
            priority: task.priority,
            created_at,
            started_at: Some(at),
            finished_at: None,
        },
        steps,
    })
}

/// Each step's position in the template's declaration order, by name (a
/// fan-in of a thousand steps looks a thousand names up).
fn step_positions(template: &Template) -> HashMap<&StepName, usize> {
    template
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| (&step.name, i))
        .collect()
}

fn millis_i32(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// The task holding an idempotency key, with the hash of the request that used it.
pub async fn find_by_idempotency_key(
    executor: impl PgExecutor<'_>,
    namespace: &str,
    key_hash: &str,
) -> Result<Option<(TaskId, Option<String>)>, StoreError> {
    let row: Option<(Uuid, Option<String>)> = sqlx::query_as(
        "select id, request_hash from weft.tasks where namespace = $1 and idempotency_key_hash = $2",
    )
    .bind(namespace)
    .bind(key_hash)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|(id, hash)| (TaskId(id), hash)))
}

/// A step that was enqueued: its message is on the queue.
#[derive(Debug, Clone, sqlx::FromRow, Deserialize)]
pub struct Enqueued {
    pub task_id: Uuid,
    pub step_id: Uuid,
    pub msg_id: i64,
    /// The task's trace context, as the step message carries it.
    pub trace: Option<Value>,
}

/// Enqueues every ready step of the given tasks (the transactional outbox:
/// state change and queue message commit together). The caller holds the
/// tasks' row locks, or created the tasks in this transaction.
pub async fn enqueue_ready_steps(
    executor: impl PgExecutor<'_>,
    task_ids: &[Uuid],
) -> Result<Vec<Enqueued>, StoreError> {
    enqueue_ready_steps_forcing(executor, task_ids, &[]).await
}

/// Like [`enqueue_ready_steps`], and also enqueues the `forced` steps when
/// ready even if their task is blocked by failures: an operator's explicit
/// retry runs the step while other failures still block the rest.
pub async fn enqueue_ready_steps_forcing(
    executor: impl PgExecutor<'_>,
    task_ids: &[Uuid],
    forced: &[Uuid],
) -> Result<Vec<Enqueued>, StoreError> {
    Ok(sqlx::query_as(
        "select task_id, step_id, msg_id, trace from weft.enqueue_ready_steps($1, null, $2)",
    )
    .bind(task_ids)
    .bind(forced)
    .fetch_all(executor)
    .await?)
}

/// What applying one result did.
#[derive(Debug, Clone, sqlx::FromRow, Deserialize)]
pub struct Applied {
    pub step_id: Uuid,
    pub attempt: i32,
    /// The step's new state, or `stale` when the result was fenced off.
    pub outcome: String,
}

impl Applied {
    pub fn is_stale(&self) -> bool {
        self.outcome == "stale"
    }
}

/// Applies decoded results (serialized result messages) under per-task row
/// locks with fencing; stale results are reported, never applied.
pub async fn apply_results(
    executor: impl PgExecutor<'_>,
    results: &Value,
) -> Result<Vec<Applied>, StoreError> {
    Ok(
        sqlx::query_as("select step_id, attempt, outcome from weft.apply_results($1)")
            .bind(results)
            .fetch_all(executor)
            .await?,
    )
}

/// A task's state after evaluation.
#[derive(Debug, Clone, sqlx::FromRow, Deserialize)]
pub struct Finalized {
    pub task_id: Uuid,
    pub state: TaskState,
    pub execution_status: ExecutionStatus,
    /// Whether this call moved the task to a final state.
    pub finalized: bool,
}

/// Moves tasks to `complete` or `error` when their steps decide it.
pub async fn finalize_tasks(
    executor: impl PgExecutor<'_>,
    task_ids: &[Uuid],
) -> Result<Vec<Finalized>, StoreError> {
    Ok(sqlx::query_as(
        "select task_id, state, execution_status, finalized from weft.finalize_tasks($1)",
    )
    .bind(task_ids)
    .fetch_all(executor)
    .await?)
}

/// What one collector batch did, in [`collect_results`]'s one statement
/// (all empty when it applied nothing).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CollectedBatch {
    /// One per result, in the order given.
    pub applied: Vec<Applied>,
    pub enqueued: Vec<Enqueued>,
    /// One per task the results touched that got no step enqueued and had
    /// none in flight (a task with a step enqueued cannot be finished, so it
    /// is not evaluated).
    pub finalized: Vec<Finalized>,
    /// Steps of due retries the batch claimed and enqueued along the way
    /// (they are among `enqueued`).
    pub retries: usize,
}

/// Applies decoded results, enqueues what became ready, finalizes their
/// tasks and deletes the result messages `msg_ids`, in one statement: one
/// round trip, and atomic without an explicit transaction. Retries due by
/// then, on tasks no other orchestrator holds, are dispatched with the batch.
pub async fn collect_results(
    executor: impl PgExecutor<'_>,
    results: &Value,
    msg_ids: &[i64],
) -> Result<CollectedBatch, StoreError> {
    let sqlx::types::Json(batch) = sqlx::query_scalar("select weft.collect_results($1, $2)")
        .bind(results)
        .bind(msg_ids)
        .fetch_one(executor)
        .await?;
    Ok(batch)
}

/// What one [`collect_batch`] did: the batch (when it applied anything),
/// the results it applied as checked, and the messages it did not accept.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ReadBatch {
    #[serde(flatten)]
    pub batch: CollectedBatch,
    /// The applied result messages as checked, in `batch.applied`'s order.
    pub results: Vec<Value>,
    /// Their message ids, in the same order.
    pub msg_ids: Vec<i64>,
    /// Messages that are not plainly well formed, now leased to this
    /// collector for the orchestrator's decoder to judge.
    pub unchecked: Vec<shared::queue::QueueMessage>,
}

/// One collector batch in one statement, the read included
/// (`weft.collect_batch`): picks up to `limit` visible results, applies the
/// well-formed ones as [`collect_results`] does and leases the others for
/// `lease_secs`. One round trip and one commit.
pub async fn collect_batch(
    executor: impl PgExecutor<'_>,
    limit: i32,
    lease_secs: i32,
) -> Result<ReadBatch, StoreError> {
    let sqlx::types::Json(batch) = sqlx::query_scalar("select weft.collect_batch($1, $2)")
        .bind(limit)
        .bind(lease_secs)
        .fetch_one(executor)
        .await?;
    Ok(batch)
}

/// One retry-scheduler iteration (`weft.dispatch_due_retries`).
#[derive(Debug, Deserialize)]
pub struct DispatchedRetries {
    /// Tasks claimed: they had a retry due and no other orchestrator held them.
    pub claimed: usize,
    pub enqueued: Vec<Enqueued>,
    /// The claimed tasks that got nothing to run, evaluated.
    pub finalized: Vec<Finalized>,
    /// Seconds until the next retry is due (negative when overdue), or None.
    pub next_due_in_s: Option<f64>,
}

/// Claims up to `limit` tasks with a retry due now (skipping tasks another
/// orchestrator holds), enqueues their ready steps and finalizes the rest,
/// in one statement: one round trip, atomic without an explicit transaction.
pub async fn dispatch_due_retries(
    executor: impl PgExecutor<'_>,
    limit: i32,
) -> Result<DispatchedRetries, StoreError> {
    let sqlx::types::Json(dispatched) = sqlx::query_scalar("select weft.dispatch_due_retries($1)")
        .bind(limit)
        .fetch_one(executor)
        .await?;
    Ok(dispatched)
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct TaskRow {
    pub id: Uuid,
    pub namespace: String,
    pub template_name: String,
    pub template_version: i32,
    pub state: TaskState,
    pub execution_status: Option<ExecutionStatus>,
    pub on_failure: String,
    pub input: Value,
    pub priority: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    pub id: Uuid,
    pub name: String,
    pub handler: String,
    pub state: StepState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub depends_on: Vec<String>,
    pub ready: bool,
    pub output: Option<Value>,
    pub last_error: Option<Value>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A task with its steps, as one read returns them.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskView {
    pub task: TaskRow,
    pub steps: Vec<StepRow>,
}

/// Reads a task with its computed execution status and its steps in
/// declaration order, with their readiness: one statement (`weft.task_view`).
pub async fn task_view(
    executor: impl PgExecutor<'_>,
    id: TaskId,
) -> Result<Option<TaskView>, StoreError> {
    let view: Option<sqlx::types::Json<TaskView>> = sqlx::query_scalar("select weft.task_view($1)")
        .bind(id.0)
        .fetch_one(executor)
        .await?;
    Ok(view.map(|v| v.0))
}

/// Reads one task with its computed execution status.
pub async fn get_task(
    executor: impl PgExecutor<'_>,
    id: TaskId,
) -> Result<Option<TaskRow>, StoreError> {
    Ok(task_view(executor, id).await?.map(|v| v.task))
}

/// Reads a task's steps in declaration order, with their readiness.
pub async fn get_steps(
    executor: impl PgExecutor<'_>,
    id: TaskId,
) -> Result<Vec<StepRow>, StoreError> {
    Ok(task_view(executor, id)
        .await?
        .map(|v| v.steps)
        .unwrap_or_default())
}

/// Whether the namespace exists (has a registered template).
pub async fn namespace_exists(
    executor: impl PgExecutor<'_>,
    namespace: &Namespace,
) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("select exists (select 1 from weft.namespaces where name = $1)")
            .bind(namespace.as_str())
            .fetch_one(executor)
            .await?,
    )
}

/// Parses a stored template definition.
pub fn parse_definition(record: &TemplateRecord) -> Result<Template, StoreError> {
    Template::from_definition(&record.definition).map_err(|e| StoreError::CorruptTemplate {
        id: record.id,
        message: e.to_string(),
    })
}

/// What an operator action did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionOutcome {
    Applied,
    /// Refused, with the reason (`not_failed`, `task_cancelled`, …).
    Refused(String),
    NotFound(String),
}

fn action_outcome(outcome: &str) -> ActionOutcome {
    match outcome {
        "applied" => ActionOutcome::Applied,
        "task_not_found" | "step_not_found" => ActionOutcome::NotFound(outcome.replace('_', " ")),
        other => ActionOutcome::Refused(other.to_owned()),
    }
}

/// Cancels a task (see `weft.cancel_task`). `None` when there is no such task;
/// otherwise its state afterwards and whether this call cancelled it.
pub async fn cancel_task(
    executor: impl PgExecutor<'_>,
    id: TaskId,
    reason: Option<&str>,
) -> Result<Option<(TaskState, bool)>, StoreError> {
    Ok(
        sqlx::query_as("select state, applied from weft.cancel_task($1, $2)")
            .bind(id.0)
            .bind(reason)
            .fetch_optional(executor)
            .await?,
    )
}

/// Gives a failed step a fresh budget of attempts; returns the step's id
/// with the outcome, so the caller can enqueue it.
pub async fn retry_step(
    executor: impl PgExecutor<'_>,
    id: TaskId,
    step: &str,
) -> Result<(Option<Uuid>, ActionOutcome), StoreError> {
    let (step_id, outcome): (Option<Uuid>, String) =
        sqlx::query_as("select step_id, outcome from weft.retry_step($1, $2)")
            .bind(id.0)
            .bind(step)
            .fetch_one(executor)
            .await?;
    Ok((step_id, action_outcome(&outcome)))
}

/// Marks a step done with an optional output.
pub async fn resolve_step(
    executor: impl PgExecutor<'_>,
    id: TaskId,
    step: &str,
    output: Option<&Value>,
) -> Result<ActionOutcome, StoreError> {
    let outcome: String = sqlx::query_scalar("select outcome from weft.resolve_step($1, $2, $3)")
        .bind(id.0)
        .bind(step)
        .bind(output)
        .fetch_one(executor)
        .await?;
    Ok(action_outcome(&outcome))
}

/// Filters and page of a task listing.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub version: Option<i32>,
    pub state: Option<TaskState>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    /// Continue after this (created_at, id), newest first.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// Lists tasks newest first, with a stable (created_at, id) order for cursors.
pub async fn list_tasks(
    executor: impl PgExecutor<'_>,
    filter: &TaskFilter,
) -> Result<Vec<TaskRow>, StoreError> {
    Ok(sqlx::query_as(
        "select t.id, t.namespace, tp.name as template_name, tp.version as template_version,
                t.state, null::text as execution_status, t.on_failure, t.input, t.priority,
                t.created_at, t.started_at, t.finished_at
         from weft.tasks t
         join weft.templates tp on tp.id = t.template_id
         where ($1::text is null or t.namespace = $1)
           and ($2::text is null or tp.name = $2)
           and ($3::int is null or tp.version = $3)
           and ($4::text is null or t.state = $4)
           and ($5::timestamptz is null or t.created_at >= $5)
           and ($6::timestamptz is null or t.created_at < $6)
           and ($7::timestamptz is null or (t.created_at, t.id) < ($7, $8))
         order by t.created_at desc, t.id desc
         limit $9",
    )
    .bind(filter.namespace.as_deref())
    .bind(filter.name.as_deref())
    .bind(filter.version)
    .bind(filter.state)
    .bind(filter.created_after)
    .bind(filter.created_before)
    .bind(filter.after.map(|a| a.0))
    .bind(filter.after.map(|a| a.1))
    .bind(filter.limit)
    .fetch_all(executor)
    .await?)
}

/// A task's counts and status, as `weft.task_execution_context` computes them.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ExecutionContext {
    pub total_steps: i32,
    pub pending_steps: i32,
    pub enqueued_steps: i32,
    pub waiting_retry_steps: i32,
    pub complete_steps: i32,
    pub error_steps: i32,
    pub cancelled_steps: i32,
    pub resolved_steps: i32,
    pub ready_steps: i32,
    pub failed_steps: i32,
    pub retry_due_later_steps: i32,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub execution_status: ExecutionStatus,
}

pub async fn execution_context(
    executor: impl PgExecutor<'_>,
    id: TaskId,
) -> Result<Option<ExecutionContext>, StoreError> {
    Ok(sqlx::query_as(
        "select total_steps, pending_steps, enqueued_steps, waiting_retry_steps, complete_steps, error_steps,
                cancelled_steps, resolved_steps, ready_steps, failed_steps, retry_due_later_steps,
                next_retry_at, execution_status
         from weft.task_execution_context(array[$1::uuid])",
    )
    .bind(id.0)
    .fetch_optional(executor)
    .await?)
}

/// One entry of a step's history: a transition, or a result fencing dropped.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub step: Option<String>,
    pub attempt: Option<i32>,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    /// `transition`, `task_transition` or `stale_result`.
    pub kind: String,
    pub reason: Option<String>,
    pub detail: Option<Value>,
}

/// A task's whole history, oldest first.
pub async fn task_history(
    executor: impl PgExecutor<'_>,
    id: TaskId,
) -> Result<Vec<HistoryEntry>, StoreError> {
    Ok(sqlx::query_as(
        "select at, step, attempt, from_state, to_state, kind, reason, detail from (
             select t.at, null::text as step, null::int as attempt, t.from_state, t.to_state,
                    'task_transition' as kind, t.reason, null::jsonb as detail, t.id as seq, 0 as src
             from weft.task_transitions t where t.task_id = $1
             union all
             select t.at, s.name, t.attempt, t.from_state, t.to_state, 'transition', t.reason, t.detail, t.id, 1
             from weft.step_transitions t join weft.steps s on s.id = t.step_id where t.task_id = $1
             union all
             select r.at, s.name, r.attempt, r.step_state, null, 'stale_result', 'fenced_off', r.result, r.id, 2
             from weft.stale_results r left join weft.steps s on s.id = r.step_id where r.task_id = $1
         ) h order by at, src, seq",
    )
    .bind(id.0)
    .fetch_all(executor)
    .await?)
}

/// A dead-lettered message.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub queue: String,
    pub msg_id: i64,
    pub enqueued_at: DateTime<Utc>,
    pub message: Value,
}

/// Every dead letter of every namespace (and of the result queue), oldest first.
pub async fn list_dead_letters(
    executor: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<DeadLetter>, StoreError> {
    Ok(
        sqlx::query_as("select queue, msg_id, enqueued_at, message from weft.dead_letters($1)")
            .bind(limit)
            .fetch_all(executor)
            .await?,
    )
}

/// Reads one dead letter, locking it.
pub async fn take_dead_letter(
    executor: impl PgExecutor<'_>,
    queue: &str,
    msg_id: i64,
) -> Result<Option<DeadLetter>, StoreError> {
    Ok(sqlx::query_as(
        "select queue, msg_id, enqueued_at, message from weft.take_dead_letter($1, $2)",
    )
    .bind(queue)
    .bind(msg_id)
    .fetch_optional(executor)
    .await?)
}

/// One invariant and its violations.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct InvariantCheck {
    pub invariant: String,
    pub violations: i64,
    pub examples: Option<Vec<String>>,
}

pub async fn check_invariants(
    executor: impl PgExecutor<'_>,
    grace: std::time::Duration,
) -> Result<Vec<InvariantCheck>, StoreError> {
    Ok(sqlx::query_as(
        "select invariant, violations, examples from weft.check_invariants(make_interval(secs => $1))",
    )
    .bind(grace.as_secs_f64())
    .fetch_all(executor)
    .await?)
}

/// A step's name, if it belongs to the task.
pub async fn step_name(
    executor: impl PgExecutor<'_>,
    task: TaskId,
    step: Uuid,
) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("select name from weft.steps where task_id = $1 and id = $2")
            .bind(task.0)
            .bind(step)
            .fetch_optional(executor)
            .await?,
    )
}
