//! Task creation: resolve the template, insert the task and its steps, and
//! enqueue its root steps, all in one transaction (one statement when it can).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};

use shared::TaskId;
use shared::template::Template;

use crate::store::{self, NewTask, StoreError};

/// Templates already read and parsed, by the (namespace, name, version)
/// requests name them with. A version never changes once registered, so an
/// entry for a pinned version stays true; an entry for "the latest version"
/// is checked by the creating statement itself, which writes nothing when a
/// newer version exists (then the entry is dropped and read again). Saves
/// creation a round trip and a parse per call. One per database: template
/// ids are the database's.
#[derive(Debug, Default)]
pub struct TemplateCache {
    entries: Mutex<HashMap<TemplateKey, Arc<Resolved>>>,
}

type TemplateKey = (String, String, Option<i32>);

/// A template as creation uses it.
#[derive(Debug)]
struct Resolved {
    id: i64,
    template: Template,
}

impl TemplateCache {
    /// Entries kept at most; the cache starts over when full (templates are
    /// few, and a miss costs one lookup).
    const CAPACITY: usize = 1024;

    fn get(&self, key: &TemplateKey) -> Option<Arc<Resolved>> {
        self.lock().get(key).cloned()
    }

    fn put(&self, key: TemplateKey, resolved: Arc<Resolved>) {
        let mut entries = self.lock();
        if entries.len() >= Self::CAPACITY {
            entries.clear();
        }
        entries.insert(key, resolved);
    }

    fn forget(&self, key: &TemplateKey) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TemplateKey, Arc<Resolved>>> {
        // The map is never left half-updated: a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

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
    templates: &TemplateCache,
    requests: &[CreateTask],
) -> Result<Vec<Created>, StoreError> {
    // One connection for every statement: a pooled acquire and release
    // each cost a round trip (sqlx checks the connection).
    let mut conn = pool.acquire().await?;
    create_tasks_on(&mut conn, templates, requests).await
}

/// As [`create_tasks`], on a connection the caller holds (idle, with no
/// transaction open; it is left so).
pub async fn create_tasks_on(
    conn: &mut PgConnection,
    templates: &TemplateCache,
    requests: &[CreateTask],
) -> Result<Vec<Created>, StoreError> {
    Ok(create(conn, templates, requests, false).await?.0)
}

/// As [`create_tasks_on`]; with `view`, a task created by the one-statement
/// path also comes back as the API shows it, read in the same statement.
async fn create(
    conn: &mut PgConnection,
    templates: &TemplateCache,
    requests: &[CreateTask],
    view: bool,
) -> Result<(Vec<Created>, Option<store::TaskView>), StoreError> {
    let groups = template_groups(requests);
    // The common case, one template and no idempotency keys: nothing can be
    // skipped, so the one statement that creates the tasks is the whole
    // transaction (with the template cached, the whole call).
    if let [group] = groups.as_slice()
        && group.iter().all(|r| r.idempotency_key_hash.is_none())
    {
        let (new_tasks, created) = create_group(conn, templates, group, view).await?;
        let ids = new_tasks.iter().map(|t| Created::New(t.id)).collect();
        return Ok((ids, created.view));
    }
    let mut tx = conn.begin().await?;
    let mut out = Vec::with_capacity(requests.len());
    for group in groups {
        let first = &group[0];
        let (new_tasks, created) = create_group(&mut tx, templates, group, false).await?;
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

/// How many times creation reads a template again after the creating
/// statement found a newer version: each read sees the latest committed, so
/// a second refusal needs yet another version registered in between.
const STALE_TEMPLATE_TRIES: usize = 3;

/// Creates one group's tasks (one template) in one statement, with the
/// template from the cache when it is there.
async fn create_group(
    conn: &mut sqlx::PgConnection,
    templates: &TemplateCache,
    group: &[CreateTask],
    view: bool,
) -> Result<(Vec<NewTask>, store::CreatedTasks), StoreError> {
    let first = &group[0];
    let key = (first.namespace.clone(), first.name.clone(), first.version);
    let mut cached = templates.get(&key);
    for _ in 0..STALE_TEMPLATE_TRIES {
        let resolved = match cached.take() {
            Some(resolved) => resolved,
            None => {
                let record =
                    store::find_template(&mut *conn, &first.namespace, &first.name, first.version)
                        .await?;
                let template = store::parse_definition(&record)?;
                let resolved = Arc::new(Resolved {
                    id: record.id,
                    template,
                });
                templates.put(key.clone(), Arc::clone(&resolved));
                resolved
            }
        };
        let new_tasks = new_tasks(group, resolved.id);
        let latest = first.version.is_none();
        let created =
            store::create_tasks(&mut *conn, &resolved.template, &new_tasks, latest, view).await?;
        if created.stale {
            templates.forget(&key);
            continue;
        }
        crate::spans::enqueued(&created.enqueued);
        return Ok((new_tasks, created));
    }
    Err(StoreError::TemplateChanging(format!(
        "{}/{}",
        first.namespace, first.name
    )))
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

/// A group's requests as tasks of the template `template_id`, each with its id.
fn new_tasks(group: &[CreateTask], template_id: i64) -> Vec<NewTask> {
    group
        .iter()
        .map(|r| {
            let id = TaskId::new();
            NewTask {
                id,
                template_id,
                input: r.input.clone(),
                priority: r.priority,
                idempotency_key_hash: r.idempotency_key_hash.clone(),
                request_hash: r.request_hash.clone(),
                trace_context: crate::spans::task_created(&id, &r.namespace, &r.name),
            }
        })
        .collect()
}

/// Creates one task.
pub async fn create_task(
    pool: &PgPool,
    templates: &TemplateCache,
    request: CreateTask,
) -> Result<Created, StoreError> {
    let mut conn = pool.acquire().await?;
    let (created, _) = create(&mut conn, templates, std::slice::from_ref(&request), false).await?;
    created
        .into_iter()
        .next()
        .ok_or(StoreError::IdempotencyConflict)
}

/// Creates one task; a new task without an idempotency key comes back with
/// its view (as `GET /v1/tasks/{id}` shows it) from the creating statement,
/// otherwise the view is `None` and the caller reads it.
pub async fn create_task_viewed(
    conn: &mut PgConnection,
    templates: &TemplateCache,
    request: CreateTask,
) -> Result<(Created, Option<store::TaskView>), StoreError> {
    let (created, view) = create(conn, templates, std::slice::from_ref(&request), true).await?;
    let created = created
        .into_iter()
        .next()
        .ok_or(StoreError::IdempotencyConflict)?;
    Ok((created, view))
}
