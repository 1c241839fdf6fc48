//! Template routes: register (YAML or JSON), list, show one version.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use shared::template::Template;
use shared::{Namespace, TemplateName};

use super::error::{ApiError, invalid, malformed, storable};
use super::extract::{Body, PathParams, QueryParams};
use super::{AppState, JitterSchema, OnFailureSchema};
use crate::store::{self, Registered, StoreError};

/// A registered template: immutable, with every default resolved.
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateBody {
    pub id: i64,
    pub namespace: String,
    pub name: String,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    /// The canonical definition: defaults applied, durations in
    /// milliseconds (`timeout_ms`, `initial_ms`, `max_ms`).
    pub definition: Value,
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

/// Registered templates, newest version first within each name.
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateList {
    pub items: Vec<TemplateBody>,
}

/// A template as authored. The server checks more than this schema can say:
/// step names are unique, dependencies name other steps of the template and
/// form no cycle, durations lie between 1ms and 24h, and a backoff's `max` is
/// at least its `initial`. A refusal names the offending field
/// (`steps[2].depends_on[0]`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a schema for the document only: shared::template parses the body
#[schema(example = json!({
    "namespace": "shop", "name": "fulfil_order", "version": 1,
    "steps": [
        {"name": "validate", "handler": "shop.validate"},
        {"name": "charge", "handler": "shop.charge", "depends_on": ["validate"],
         "retry": {"max_attempts": 5}}
    ]
}))]
pub struct TemplateDocument {
    #[schema(pattern = "^[a-z][a-z0-9_]{0,29}$")]
    namespace: String,
    #[schema(pattern = "^[a-z][a-z0-9_]{0,62}$")]
    name: String,
    /// Versions are immutable: the same content again is a no-op, different
    /// content is refused.
    #[schema(minimum = 1)]
    version: i32,
    #[schema(max_length = 1000)]
    description: Option<String>,
    /// `fail_fast` (the default) enqueues nothing new once a step fails;
    /// `continue` lets independent branches run on.
    #[serde(default)]
    #[schema(value_type = OnFailureSchema)]
    on_failure: Option<String>,
    defaults: Option<SettingsDocument>,
    #[schema(min_items = 1, max_items = 5000)]
    steps: Vec<StepDocument>,
}

/// Settings inherited by every step, field by field.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // schema only
pub struct SettingsDocument {
    /// How long one attempt may run, such as `30s` (the default).
    #[schema(pattern = "^([0-9]+(ms|s|m|h))+$")]
    timeout: Option<String>,
    retry: Option<RetryDocument>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // schema only
pub struct StepDocument {
    #[schema(pattern = "^[a-z][a-z0-9_]{0,62}$")]
    name: String,
    /// Dot-separated segments such as `payments.charge_card`.
    #[schema(pattern = "^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)*$", max_length = 128)]
    handler: String,
    /// Handed to the handler as is.
    config: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[schema(pattern = "^([0-9]+(ms|s|m|h))+$")]
    timeout: Option<String>,
    retry: Option<RetryDocument>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // schema only
pub struct RetryDocument {
    /// Attempts in total, the first included.
    #[schema(minimum = 1, maximum = 100)]
    max_attempts: Option<i32>,
    backoff: Option<BackoffDocument>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // schema only
pub struct BackoffDocument {
    #[schema(pattern = "^([0-9]+(ms|s|m|h))+$")]
    initial: Option<String>,
    #[schema(pattern = "^([0-9]+(ms|s|m|h))+$")]
    max: Option<String>,
    #[schema(minimum = 1.0)]
    multiplier: Option<f64>,
    #[schema(value_type = Option<JitterSchema>)]
    jitter: Option<String>,
}

/// Registers a template.
#[utoipa::path(
    post,
    path = "/v1/templates",
    tag = "templates",
    request_body(
        description = "The template, as YAML or JSON",
        content(
            (TemplateDocument = "application/json"),
            (TemplateDocument = "application/yaml"),
        ),
    ),
    responses(
        (status = 201, description = "Registered", body = TemplateBody),
        (status = 200, description = "Already registered with the same content", body = TemplateBody),
        (status = 400, description = "The body is not UTF-8"),
        (status = 409, description = "This version exists with different content"),
        (status = 413, description = "The body exceeds 2 MiB"),
        (status = 422, description = "Not a valid template; `errors` names the field"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn create_template(
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body).map_err(|_| malformed("", "body is not UTF-8"))?;
    let template = Template::parse(text).map_err(|e| invalid(e.path, e.message))?;
    storable(&template.definition(), "")?;
    let mut conn = state.pool.acquire().await.map_err(StoreError::from)?;
    let (status, record) = match store::register_template(&mut conn, &template).await? {
        Registered::Created(r) => (StatusCode::CREATED, r),
        Registered::Unchanged(r) => (StatusCode::OK, r),
    };
    Ok((status, Json(TemplateBody::from(record))).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TemplateFilter {
    /// Only templates of this namespace.
    #[param(pattern = "^[a-z][a-z0-9_]{0,29}$")]
    namespace: Option<String>,
}

/// Lists registered templates.
#[utoipa::path(
    get,
    path = "/v1/templates",
    tag = "templates",
    params(TemplateFilter),
    responses(
        (status = 200, description = "Templates, newest version first within each name", body = TemplateList),
        (status = 400, description = "Unknown or malformed query parameters"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn list_templates(
    State(state): State<AppState>,
    QueryParams(filter): QueryParams<TemplateFilter>,
) -> Result<Json<TemplateList>, ApiError> {
    if let Some(namespace) = &filter.namespace {
        Namespace::parse(namespace.as_str()).map_err(|e| malformed("namespace", e.to_string()))?;
    }
    let records = store::list_templates(&state.pool, filter.namespace.as_deref()).await?;
    Ok(Json(TemplateList {
        items: records.into_iter().map(Into::into).collect(),
    }))
}

/// Shows one registered template version.
#[utoipa::path(
    get,
    path = "/v1/templates/{namespace}/{name}/{version}",
    tag = "templates",
    params(
        ("namespace" = String, Path, pattern = "^[a-z][a-z0-9_]{0,29}$"),
        ("name" = String, Path, pattern = "^[a-z][a-z0-9_]{0,62}$"),
        ("version" = i32, Path, minimum = 1),
    ),
    responses(
        (status = 200, description = "The template", body = TemplateBody),
        (status = 400, description = "A name breaks its rule, or the version is not a whole number"),
        (status = 404, description = "No such template version"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn get_template(
    State(state): State<AppState>,
    PathParams((namespace, name, version)): PathParams<(String, String, String)>,
) -> Result<Json<TemplateBody>, ApiError> {
    Namespace::parse(namespace.as_str()).map_err(|e| malformed("namespace", e.to_string()))?;
    TemplateName::parse(name.as_str()).map_err(|e| malformed("name", e.to_string()))?;
    let version: i32 = version
        .parse()
        .map_err(|_| malformed("version", format!("`{version}` is not a whole number")))?;
    let record = store::find_template(&state.pool, &namespace, &name, Some(version)).await?;
    Ok(Json(record.into()))
}
