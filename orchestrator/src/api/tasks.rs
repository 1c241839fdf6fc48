//! Task routes: create one or a batch (idempotently), read one, list.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use shared::{Namespace, TaskState, TemplateName};

use super::error::{ApiError, from_object, invalid, malformed, parse_object, storable, too_large};
use super::extract::{Body, PathParams, QueryParams, page_limit};
use super::views::{Task, TaskSummary, task_body, task_id};
use super::{AppState, TaskStateSchema};
use crate::store::{self, StoreError};
use crate::tasks::{self, CreateTask, Created};

/// Largest number of tasks per batch call.
pub const MAX_BATCH: usize = 1_000;
/// Largest task input, serialized as compact JSON.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;

/// `POST /v1/tasks` body.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskBody {
    #[schema(pattern = "^[a-z][a-z0-9_]{0,29}$")]
    pub namespace: String,
    /// The template's name.
    #[schema(pattern = "^[a-z][a-z0-9_]{0,62}$")]
    pub name: String,
    /// The template version; the latest when absent.
    #[serde(default, deserialize_with = "whole_i32")]
    #[schema(minimum = 1)]
    pub version: Option<i32>,
    /// Any JSON value, at most 1 MiB serialized, without U+0000 in its
    /// strings (PostgreSQL cannot store it); handed to every step.
    #[serde(default)]
    pub input: Value,
    /// Creating again with the same key (in the namespace) returns the
    /// existing task with 200; with a different request, 409.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255)]
    pub idempotency_key: Option<String>,
    /// Higher runs first.
    #[serde(default, deserialize_with = "whole_i32")]
    pub priority: Option<i32>,
}

/// An optional 32-bit whole number, written `415` or `415.0`: JSON Schema's
/// `integer` admits both spellings, so the API does too.
fn whole_i32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= 2_f64.powi(53))
            .map(|f| f as i64)
    });
    whole
        .and_then(|n| i32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected a whole number from {} to {}, got {number}",
                i32::MIN,
                i32::MAX
            ))
        })
}

/// Counts the bytes of a serialization without keeping them.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CreateTaskBody {
    fn check(self) -> Result<Self, ApiError> {
        Namespace::parse(self.namespace.as_str())
            .map_err(|e| invalid("namespace", e.to_string()))?;
        TemplateName::parse(self.name.as_str()).map_err(|e| invalid("name", e.to_string()))?;
        if self.version.is_some_and(|v| v < 1) {
            return Err(invalid("version", "must be at least 1"));
        }
        if self
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.is_empty() || k.chars().count() > 255)
        {
            return Err(invalid("idempotency_key", "must be 1 to 255 characters"));
        }
        let mut size = Counter(0);
        // Writing a Value to a counter cannot fail.
        let _ = serde_json::to_writer(&mut size, &self.input);
        if size.0 > MAX_INPUT_BYTES {
            return Err(too_large(
                "input",
                format!(
                    "the task input is {} bytes as JSON; the limit is 1 MiB ({MAX_INPUT_BYTES} bytes)",
                    size.0
                ),
            ));
        }
        storable(&self.input, "input")?;
        Ok(self)
    }

    fn into_request(self) -> CreateTask {
        let key_hash = self.idempotency_key.as_deref().map(sha256_hex);
        let request_hash = key_hash.as_ref().map(|_| {
            let canonical = json!([
                self.namespace,
                self.name,
                self.version,
                self.input,
                self.priority
            ]);
            sha256_hex(&canonical.to_string())
        });
        CreateTask {
            namespace: self.namespace,
            name: self.name,
            version: self.version,
            input: self.input,
            priority: self.priority.unwrap_or(0),
            idempotency_key_hash: key_hash,
            request_hash,
        }
    }
}

/// A stable SHA-256 hex digest.
fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates a task and enqueues its first steps.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    request_body = CreateTaskBody,
    responses(
        (status = 201, description = "Created", body = Task),
        (status = 200, description = "The task created earlier with this idempotency key", body = Task),
        (status = 400, description = "The body is not JSON"),
        (status = 404, description = "No such template"),
        (status = 409, description = "The idempotency key was used with a different request"),
        (status = 413, description = "The body exceeds 2 MiB or the input 1 MiB"),
        (status = 422, description = "A field is invalid; `errors` names it"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn create_task(
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request = parse_object::<CreateTaskBody>(&body)?
        .check()?
        .into_request();
    let mut db = state.db.lend().await.map_err(StoreError::from)?;
    let (created, view) = tasks::create_task_viewed(&mut db, &state.templates, request).await?;
    let status = match created {
        Created::New(_) => StatusCode::CREATED,
        Created::Existing(_) => StatusCode::OK,
    };
    let body = match view {
        Some(view) => Task::from(view),
        None => task_body(&mut *db, created.id()).await?,
    };
    db.settle();
    Ok((status, Json(body)).into_response())
}

/// `POST /v1/tasks/batch` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    #[schema(value_type = Vec<CreateTaskBody>, min_items = 1, max_items = 1000)]
    tasks: Vec<Value>,
}

/// What became of one task of a batch, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    pub id: Uuid,
    /// False when the idempotency key named an existing task.
    pub created: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchCreated {
    pub tasks: Vec<BatchItem>,
}

/// Creates up to 1000 tasks in one transaction: all or none.
#[utoipa::path(
    post,
    path = "/v1/tasks/batch",
    tag = "tasks",
    request_body = BatchBody,
    responses(
        (status = 201, description = "Every task created or found by its idempotency key", body = BatchCreated),
        (status = 400, description = "The body is not JSON"),
        (status = 404, description = "A template does not exist"),
        (status = 409, description = "An idempotency key was used with a different request"),
        (status = 413, description = "The body exceeds 2 MiB or an input 1 MiB"),
        (status = 422, description = "A field is invalid; `errors` names it (`tasks[3].namespace`)"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn create_task_batch(
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let batch: BatchBody = parse_object(&body)?;
    if batch.tasks.is_empty() || batch.tasks.len() > MAX_BATCH {
        return Err(invalid(
            "tasks",
            format!("must hold 1 to {MAX_BATCH} tasks"),
        ));
    }
    let mut requests = Vec::with_capacity(batch.tasks.len());
    for (i, raw) in batch.tasks.into_iter().enumerate() {
        let parsed = from_object::<CreateTaskBody>(raw)
            .and_then(CreateTaskBody::check)
            .map_err(|e| e.within(&format!("tasks[{i}]")))?;
        requests.push(parsed.into_request());
    }
    let mut db = state.db.lend().await.map_err(StoreError::from)?;
    let created = tasks::create_tasks_on(&mut db, &state.templates, &requests).await?;
    db.settle();
    let items = created
        .iter()
        .map(|c| BatchItem {
            id: c.id().0,
            created: matches!(c, Created::New(_)),
        })
        .collect();
    Ok((StatusCode::CREATED, Json(BatchCreated { tasks: items })).into_response())
}

/// Shows a task with its steps.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 400, description = "The id is not a UUID"),
        (status = 404, description = "No such task"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn get_task(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Task>, ApiError> {
    let id = task_id(&id)?;
    let mut db = state.db.lend().await.map_err(StoreError::from)?;
    let body = task_body(&mut *db, id).await?;
    db.settle();
    Ok(Json(body))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    #[param(pattern = "^[a-z][a-z0-9_]{0,29}$")]
    namespace: Option<String>,
    /// Template name.
    #[param(pattern = "^[a-z][a-z0-9_]{0,62}$")]
    name: Option<String>,
    /// Template version.
    version: Option<i32>,
    #[param(value_type = Option<TaskStateSchema>)]
    state: Option<String>,
    /// Created at or after this instant.
    created_after: Option<DateTime<Utc>>,
    /// Created before this instant.
    created_before: Option<DateTime<Utc>>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^-?[0-9]{1,18}_[0-9a-fA-F]{32}$")]
    cursor: Option<String>,
    /// Tasks per page (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// A page of tasks, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskList {
    pub items: Vec<TaskSummary>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(row: &store::TaskRow) -> String {
    format!("{}_{}", row.created_at.timestamp_micros(), row.id.simple())
}

/// Reads a cursor of exactly the documented form (`-?[0-9]{1,18}_[0-9a-f]{32}`).
fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    let digits = micros.strip_prefix('-').unwrap_or(micros);
    let well_formed = (1..=18).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && id.len() == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit());
    if !well_formed {
        return None;
    }
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, Uuid::try_parse(id).ok()?))
}

/// Lists tasks, newest first, with cursor pagination.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of tasks", body = TaskList),
        (status = 400, description = "An unknown, malformed or out-of-range query parameter"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn list_tasks(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<TaskList>, ApiError> {
    let limit = page_limit(q.limit, 50)?;
    if let Some(namespace) = &q.namespace {
        Namespace::parse(namespace.as_str()).map_err(|e| malformed("namespace", e.to_string()))?;
    }
    if let Some(name) = &q.name {
        TemplateName::parse(name.as_str()).map_err(|e| malformed("name", e.to_string()))?;
    }
    let task_state = match q.state.as_deref() {
        Some(s) => Some(
            s.parse::<TaskState>()
                .map_err(|e| malformed("state", e.to_string()))?,
        ),
        None => None,
    };
    let after = match q.cursor.as_deref() {
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| malformed("cursor", "is not a cursor this API returned"))?,
        ),
        None => None,
    };
    let filter = store::TaskFilter {
        namespace: q.namespace,
        name: q.name,
        version: q.version,
        state: task_state,
        created_after: q.created_after,
        created_before: q.created_before,
        after,
        limit: limit + 1,
    };
    let mut db = state.db.lend().await.map_err(StoreError::from)?;
    let mut rows = store::list_tasks(&mut *db, &filter).await?;
    db.settle();
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(TaskList {
        items: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}
