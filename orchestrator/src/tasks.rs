//! Task creation: resolve the template, insert the task and its steps, and
//! enqueue its root steps, all in one transaction.

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

/// Creates many tasks of one template in one transaction. Returns, in order,
/// what happened to each.
pub async fn create_tasks(
    pool: &PgPool,
    requests: &[CreateTask],
) -> Result<Vec<Created>, StoreError> {
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(requests.len());
    // Group consecutive requests of the same template so bulk creation is a
    // handful of statements, not a round trip per task.
    let mut start = 0;
    while start < requests.len() {
        let first = &requests[start];
        let end = requests[start..]
            .iter()
            .position(|r| {
                (r.namespace.as_str(), r.name.as_str(), r.version)
                    != (first.namespace.as_str(), first.name.as_str(), first.version)
            })
            .map_or(requests.len(), |offset| start + offset);
        let record =
            store::find_template(&mut *tx, &first.namespace, &first.name, first.version).await?;
        let template = store::parse_definition(&record)?;
        let group = &requests[start..end];
        let new_tasks: Vec<NewTask> = group
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
        let inserted = store::insert_tasks(&mut tx, &template, &new_tasks).await?;
        let inserted_ids: Vec<uuid::Uuid> = inserted.iter().map(|id| id.0).collect();
        crate::spans::enqueued(&store::enqueue_ready_steps(&mut *tx, &inserted_ids).await?);
        for (request, task) in group.iter().zip(&new_tasks) {
            if inserted.contains(&task.id) {
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
        start = end;
    }
    tx.commit().await?;
    Ok(out)
}

/// Creates one task.
pub async fn create_task(pool: &PgPool, request: CreateTask) -> Result<Created, StoreError> {
    let created = create_tasks(pool, std::slice::from_ref(&request)).await?;
    created
        .into_iter()
        .next()
        .ok_or(StoreError::IdempotencyConflict)
}
