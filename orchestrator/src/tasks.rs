//! Task creation: resolve the template, insert the task and its steps, and
//! enqueue its root steps, all in one transaction (one statement when it can).

use serde_json::Value;
use sqlx::PgPool;

use shared::TaskId;

use crate::store::{self, NewTask, StoreError};

/// A request to run a template.
#[derive(Debug, Clone)]
pub struct CreateTask {
    pub namespace: String,
    pub name: String,
    pub version: Option<i32>,
    pub input: Value,
    pub priority: i32,
    pub idempotency_key_hash: Option<String>,
    pub request_hash: Option<String>,
}

/// Whether a task was created or already existed under its idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New(TaskId),
    Existing(TaskId),
}

impl Created {
    pub fn id(self) -> TaskId {
        match self {
            Created::New(id) | Created::Existing(id) => id,
        }
    }
}

/// Creates many tasks in one transaction: all or none. Returns, in order,
/// what happened to each.
pub async fn create_tasks(
    pool: &PgPool,
    requests: &[CreateTask],
) -> Result<Vec<Created>, StoreError> {
    Ok(create(pool, requests, false).await?.0)
}

/// As [`create_tasks`]; with `view`, a task created by the one-statement
/// path also comes back as the API shows it, read in the same statement.
async fn create(
    pool: &PgPool,
    requests: &[CreateTask],
    view: bool,
) -> Result<(Vec<Created>, Option<store::TaskView>), StoreError> {
    let groups = template_groups(requests);
    // The common case, one template and no idempotency keys: nothing can be
    // skipped, so the one statement that creates the tasks is the whole
    // transaction (two statements in all, with the template lookup).
    if let [group] = groups.as_slice()
        && group.iter().all(|r| r.idempotency_key_hash.is_none())
    {
        // One connection for both statements: a pooled acquire and release
        // each cost a round trip (sqlx checks the connection).
        let mut conn = pool.acquire().await?;
        let (template, new_tasks) = prepare(&mut *conn, group).await?;
        let created = store::create_tasks(&mut *conn, &template, &new_tasks, view).await?;
        crate::spans::enqueued(&created.enqueued);
        let ids = new_tasks.iter().map(|t| Created::New(t.id)).collect();
        return Ok((ids, created.view));
    }
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(requests.len());
    for group in groups {
        let first = &group[0];
        let (template, new_tasks) = prepare(&mut *tx, group).await?;
        let created = store::create_tasks(&mut *tx, &template, &new_tasks, false).await?;
        crate::spans::enqueued(&created.enqueued);
        for (request, task) in group.iter().zip(&new_tasks) {
            if created.inserted.contains(&task.id) {
                out.push(Created::New(task.id));
                continue;
            }
            // The idempotency key was taken: by an earlier request or a
            // concurrent one that committed first.
            let key = request.idempotency_key_hash.as_deref().unwrap_or_default();
            match store::find_by_idempotency_key(&mut *tx, &first.namespace, key).await? {
                Some((id, hash)) if hash == request.request_hash => out.push(Created::Existing(id)),
                Some(_) => return Err(StoreError::IdempotencyConflict),
                None => return Err(StoreError::IdempotencyConflict),
            }
        }
    }
    tx.commit().await?;
    Ok((out, None))
}

/// Consecutive requests of the same template, so bulk creation is one
/// statement per template, not a round trip per task.
fn template_groups(requests: &[CreateTask]) -> Vec<&[CreateTask]> {
    let mut groups = Vec::new();
    let mut rest = requests;
    while let Some(first) = rest.first() {
        let key = |r: &CreateTask| (r.namespace.clone(), r.name.clone(), r.version);
        let len = rest
            .iter()
            .position(|r| key(r) != key(first))
            .unwrap_or(rest.len());
        let (group, tail) = rest.split_at(len);
        groups.push(group);
        rest = tail;
    }
    groups
}

/// Resolves a group's template and gives each request its task id.
async fn prepare(
    executor: impl sqlx::PgExecutor<'_>,
    group: &[CreateTask],
) -> Result<(shared::template::Template, Vec<NewTask>), StoreError> {
    let first = &group[0];
    let record =
        store::find_template(executor, &first.namespace, &first.name, first.version).await?;
    let template = store::parse_definition(&record)?;
    let new_tasks = group
        .iter()
        .map(|r| {
            let id = TaskId::new();
            NewTask {
                id,
                template_id: record.id,
                input: r.input.clone(),
                priority: r.priority,
                idempotency_key_hash: r.idempotency_key_hash.clone(),
                request_hash: r.request_hash.clone(),
                trace_context: crate::spans::task_created(&id, &first.namespace, &first.name),
            }
        })
        .collect();
    Ok((template, new_tasks))
}

/// Creates one task.
pub async fn create_task(pool: &PgPool, request: CreateTask) -> Result<Created, StoreError> {
    let (created, _) = create(pool, std::slice::from_ref(&request), false).await?;
    created
        .into_iter()
        .next()
        .ok_or(StoreError::IdempotencyConflict)
}

/// Creates one task; a new task without an idempotency key comes back with
/// its view (as `GET /v1/tasks/{id}` shows it) from the creating statement,
/// otherwise the view is `None` and the caller reads it.
pub async fn create_task_viewed(
    pool: &PgPool,
    request: CreateTask,
) -> Result<(Created, Option<store::TaskView>), StoreError> {
    let (created, view) = create(pool, std::slice::from_ref(&request), true).await?;
    let created = created
        .into_iter()
        .next()
        .ok_or(StoreError::IdempotencyConflict)?;
    Ok((created, view))
}
