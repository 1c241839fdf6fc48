//! The REST API: templates, tasks, health and metrics. Handlers validate at
//! the edge and call the store; errors are `application/problem+json` and
//! never echo database text.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tracing::error;

use shared::template::Template;
use shared::{Namespace, TaskId};

use crate::metrics::Metrics;
use crate::operator;
use crate::store::{self, Registered, StoreError};
use crate::tasks::{self, CreateTask, Created};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub metrics: Metrics,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/templates", post(create_template).get(list_templates))
        .route(
            "/v1/templates/{namespace}/{name}/{version}",
            get(get_template),
        )
        .route("/v1/tasks", post(create_task).get(list_tasks))
        .route("/v1/tasks/batch", post(create_task_batch))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/explain", get(explain_task))
        .route("/v1/tasks/{id}/history", get(task_history))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/tasks/{id}/steps/{step}/retry", post(retry_step))
        .route("/v1/tasks/{id}/steps/{step}/resolve", post(resolve_step))
        .route("/v1/queues", get(queues))
        .route("/v1/dlq", get(dead_letters))
        .route("/v1/dlq/{id}/replay", post(replay_dead_letter))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The one HTTP error type: a status and a problem document.
#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed or invalid; `path` names the offending field.
    Invalid {
        status: StatusCode,
        path: String,
        message: String,
    },
    NotFound(String),
    Conflict(String),
    Unavailable,
    Internal,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TemplateConflict { .. } | StoreError::IdempotencyConflict => {
                ApiError::Conflict(e.to_string())
            }
            StoreError::TemplateNotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::CorruptTemplate { .. } => {
                error!(error = %e, "stored template unreadable");
                ApiError::Internal
            }
            StoreError::Database(db) => {
                error!(error = %db, "database error serving a request");
                if matches!(db, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) {
                    ApiError::Unavailable
                } else {
                    ApiError::Internal
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, title, detail, path) = match self {
            ApiError::Invalid {
                status,
                path,
                message,
            } => (status, "invalid request", message, Some(path)),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not found", m, None),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m, None),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unreachable; retry later".to_owned(),
                None,
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                "an internal error occurred; see the server log".to_owned(),
                None,
            ),
        };
        let mut body = json!({
            "type": format!("https://weft.dev/problems/{}", title.replace(' ', "-")),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        });
        if let Some(path) = path {
            body["errors"] = json!([{ "path": path, "message": body["detail"].clone() }]);
        }
        let mut response = (status, Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        path: path.into(),
        message: message.into(),
    }
}

#[derive(Serialize)]
struct TemplateBody {
    id: i64,
    namespace: String,
    name: String,
    version: i32,
    created_at: chrono::DateTime<chrono::Utc>,
    definition: Value,
}

impl From<store::TemplateRecord> for TemplateBody {
    fn from(r: store::TemplateRecord) -> Self {
        Self {
            id: r.id,
            namespace: r.namespace,
            name: r.name,
            version: r.version,
            created_at: r.created_at,
            definition: r.definition,
        }
    }
}

async fn create_template(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        path: "".into(),
        message: "body is not UTF-8".into(),
    })?;
    let template = Template::parse(text).map_err(|e| invalid(e.path, e.message))?;
    let mut conn = state.pool.acquire().await.map_err(StoreError::from)?;
    let (status, record) = match store::register_template(&mut conn, &template).await? {
        Registered::Created(r) => (StatusCode::CREATED, r),
        Registered::Unchanged(r) => (StatusCode::OK, r),
    };
    Ok((status, Json(TemplateBody::from(record))).into_response())
}

#[derive(Deserialize)]
struct TemplateFilter {
    namespace: Option<String>,
}

async fn list_templates(
    State(state): State<AppState>,
    Query(filter): Query<TemplateFilter>,
) -> Result<Json<Value>, ApiError> {
    let records = store::list_templates(&state.pool, filter.namespace.as_deref()).await?;
    let items: Vec<TemplateBody> = records.into_iter().map(Into::into).collect();
    Ok(Json(json!({ "items": items })))
}

async fn get_template(
    State(state): State<AppState>,
    Path((namespace, name, version)): Path<(String, String, i32)>,
) -> Result<Json<TemplateBody>, ApiError> {
    let record = store::find_template(&state.pool, &namespace, &name, Some(version)).await?;
    Ok(Json(record.into()))
}

/// `POST /v1/tasks` body.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskBody {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub version: Option<i32>,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub priority: Option<i32>,
}

/// A stable SHA-256 hex digest.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl CreateTaskBody {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let parsed: Self = parse_json(body)?;
        Namespace::parse(parsed.namespace.clone())
            .map_err(|e| invalid("namespace", e.to_string()))?;
        if parsed.version.is_some_and(|v| v < 1) {
            return Err(invalid("version", "must be at least 1"));
        }
        if parsed
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.is_empty() || k.len() > 255)
        {
            return Err(invalid("idempotency_key", "must be 1 to 255 characters"));
        }
        Ok(parsed)
    }

    fn into_request(self) -> CreateTask {
        let key_hash = self
            .idempotency_key
            .as_deref()
            .map(|k| sha256_hex(k.as_bytes()));
        let request_hash = key_hash.as_ref().map(|_| {
            let canonical = json!([
                self.namespace,
                self.name,
                self.version,
                self.input,
                self.priority
            ]);
            sha256_hex(canonical.to_string().as_bytes())
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

/// Parses a JSON body, naming the offending field on failure.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let status = if inner.is_syntax() || inner.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        let path = if path == "." { String::new() } else { path };
        ApiError::Invalid {
            status,
            path,
            message: inner.to_string(),
        }
    })
}

async fn create_task(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request = CreateTaskBody::parse(&body)?.into_request();
    let created = tasks::create_task(&state.pool, request).await?;
    let status = match created {
        Created::New(_) => StatusCode::CREATED,
        Created::Existing(_) => StatusCode::OK,
    };
    let body = task_body(&state.pool, created.id()).await?;
    Ok((status, Json(body)).into_response())
}

/// A task with its steps, as every task read returns it.
pub async fn task_body(pool: &PgPool, id: TaskId) -> Result<Value, ApiError> {
    let task = store::get_task(pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("task {id} not found")))?;
    let steps = store::get_steps(pool, id).await?;
    let mut body = serde_json::to_value(task).map_err(|_| ApiError::Internal)?;
    body["steps"] = serde_json::to_value(steps).map_err(|_| ApiError::Internal)?;
    Ok(body)
}

fn task_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse().map_err(|_| ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        path: "id".into(),
        message: "task id must be a UUID".into(),
    })
}

async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(task_body(&state.pool, task_id(&id)?).await?))
}

/// Largest number of tasks per batch call.
pub const MAX_BATCH: usize = 1_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    tasks: Vec<Value>,
}

async fn create_task_batch(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let batch: BatchBody = parse_json(&body)?;
    if batch.tasks.is_empty() || batch.tasks.len() > MAX_BATCH {
        return Err(invalid(
            "tasks",
            format!("must hold 1 to {MAX_BATCH} tasks"),
        ));
    }
    let mut requests = Vec::with_capacity(batch.tasks.len());
    for (i, raw) in batch.tasks.iter().enumerate() {
        let bytes = serde_json::to_vec(raw).map_err(|_| ApiError::Internal)?;
        let parsed = CreateTaskBody::parse(&bytes).map_err(|e| match e {
            ApiError::Invalid {
                status,
                path,
                message,
            } => {
                let path = if path.is_empty() {
                    format!("tasks[{i}]")
                } else {
                    format!("tasks[{i}].{path}")
                };
                ApiError::Invalid {
                    status,
                    path,
                    message,
                }
            }
            other => other,
        })?;
        requests.push(parsed.into_request());
    }
    let created = tasks::create_tasks(&state.pool, &requests).await?;
    let items: Vec<Value> = created
        .iter()
        .map(|c| json!({ "id": c.id(), "created": matches!(c, Created::New(_)) }))
        .collect();
    Ok((StatusCode::CREATED, Json(json!({ "tasks": items }))).into_response())
}

/// Largest page of a task listing.
pub const MAX_PAGE: i64 = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    namespace: Option<String>,
    name: Option<String>,
    version: Option<i32>,
    state: Option<String>,
    created_after: Option<chrono::DateTime<chrono::Utc>>,
    created_before: Option<chrono::DateTime<chrono::Utc>>,
    cursor: Option<String>,
    limit: Option<i64>,
}

fn encode_cursor(row: &store::TaskRow) -> String {
    format!("{}_{}", row.created_at.timestamp_micros(), row.id.simple())
}

fn decode_cursor(cursor: &str) -> Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    let at = chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, id.parse().ok()?))
}

async fn list_tasks(
    State(state): State<AppState>,
    query: Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let q = query.0;
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    let task_state = match q.state.as_deref() {
        Some(s) => Some(
            s.parse::<shared::TaskState>()
                .map_err(|e| invalid("state", e.to_string()))?,
        ),
        None => None,
    };
    let after = match q.cursor.as_deref() {
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| invalid("cursor", "is not a cursor this API returned"))?,
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
    let mut rows = store::list_tasks(&state.pool, &filter).await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(json!({ "items": rows, "next_cursor": next })))
}

async fn explain_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&id)?;
    let explanation = operator::explain(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("task {id} not found")))?;
    Ok(Json(
        serde_json::to_value(explanation).map_err(|_| ApiError::Internal)?,
    ))
}

async fn task_history(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&id)?;
    if store::get_task(&state.pool, id).await?.is_none() {
        return Err(ApiError::NotFound(format!("task {id} not found")));
    }
    let entries = store::task_history(&state.pool, id).await?;
    Ok(Json(json!({ "items": entries })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = task_id(&id)?;
    let body: CancelBody = if body.is_empty() {
        CancelBody::default()
    } else {
        parse_json(&body)?
    };
    match operator::cancel(&state.pool, id, body.reason.as_deref()).await? {
        None => Err(ApiError::NotFound(format!("task {id} not found"))),
        Some((_, true)) => Ok(Json(task_body(&state.pool, id).await?).into_response()),
        Some((task_state, false)) => Err(ApiError::Conflict(format!(
            "task {id} is already {task_state} and cannot be cancelled"
        ))),
    }
}

fn repaired(outcome: store::ActionOutcome, id: TaskId, step: &str) -> Result<(), ApiError> {
    match outcome {
        store::ActionOutcome::Applied => Ok(()),
        store::ActionOutcome::NotFound(what) => Err(ApiError::NotFound(format!(
            "{what}: task {id}, step {step}"
        ))),
        store::ActionOutcome::Refused(reason) => Err(ApiError::Conflict(format!(
            "step {step} of task {id}: {}",
            reason.replace('_', " ")
        ))),
    }
}

async fn retry_step(
    State(state): State<AppState>,
    Path((id, step)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&id)?;
    let outcome = operator::repair(&state.pool, id, &step, operator::Repair::Retry).await?;
    repaired(outcome, id, &step)?;
    Ok(Json(task_body(&state.pool, id).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    output: Option<Value>,
}

async fn resolve_step(
    State(state): State<AppState>,
    Path((id, step)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&id)?;
    let body: ResolveBody = if body.is_empty() {
        ResolveBody::default()
    } else {
        parse_json(&body)?
    };
    let outcome = operator::repair(
        &state.pool,
        id,
        &step,
        operator::Repair::Resolve {
            output: body.output,
        },
    )
    .await?;
    repaired(outcome, id, &step)?;
    Ok(Json(task_body(&state.pool, id).await?))
}

async fn queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let stats = shared::queue::stats(&state.pool)
        .await
        .map_err(StoreError::from)?;
    let items: Vec<Value> = stats
        .into_iter()
        .map(|q| {
            json!({
                "queue": q.queue_name,
                "depth": q.depth,
                "in_flight": q.in_flight,
                "oldest_message_age_seconds": q.oldest_age_secs,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqQuery {
    limit: Option<i64>,
}

async fn dead_letters(
    State(state): State<AppState>,
    query: Query<DlqQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.0.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    let letters = store::list_dead_letters(&state.pool, limit).await?;
    let items: Vec<Value> = letters
        .into_iter()
        .map(|d| {
            json!({
                "id": format!("{}:{}", d.queue, d.msg_id),
                "queue": d.queue,
                "dead_lettered_at": d.enqueued_at,
                "reason": d.message.get("reason"),
                "detail": d.message.get("detail"),
                "task_id": d.message.pointer("/message/task_id"),
                "step_id": d.message.pointer("/message/step_id"),
                "step": d.message.pointer("/message/step"),
                "message": d.message,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn replay_dead_letter(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let parsed = id
        .rsplit_once(':')
        .and_then(|(queue, msg)| Some((queue.to_owned(), msg.parse::<i64>().ok()?)));
    let Some((queue, msg_id)) = parsed else {
        return Err(ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            path: "id".into(),
            message: "a dead letter id looks like weft_dlq_<namespace>:<number>".into(),
        });
    };
    match operator::replay_dead_letter(&state.pool, &queue, msg_id).await? {
        operator::Replayed::Step { task_id, step } => Ok(Json(
            json!({ "replayed": id, "task_id": task_id, "step": step }),
        )),
        operator::Replayed::NotFound => {
            Err(ApiError::NotFound(format!("dead letter {id} not found")))
        }
        operator::Replayed::Refused(reason) => {
            Err(ApiError::Conflict(format!("dead letter {id}: {reason}")))
        }
    }
}

async fn ready(State(state): State<AppState>) -> Response {
    match sqlx::query("select 1").execute(&state.pool).await {
        Ok(_) => (StatusCode::OK, "ready").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
        .into_response()
}
