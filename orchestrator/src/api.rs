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
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{id}", get(get_task))
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

async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: TaskId = id.parse().map_err(|_| ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        path: "id".into(),
        message: "task id must be a UUID".into(),
    })?;
    Ok(Json(task_body(&state.pool, id).await?))
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
