//! The REST API: templates, tasks, operator actions, health and metrics.
//!
//! Every `/v1` route is registered once, through `utoipa-axum`'s
//! [`OpenApiRouter`], which files the handler in the router and its
//! `#[utoipa::path]` annotation in the OpenAPI document served at
//! `/v1/openapi.json`: the two cannot drift. The scope a route needs is
//! decided by the group it is registered in, and that group also writes the
//! route's security requirement and its 401/403 responses.
//!
//! Handlers validate at the edge and call the store or the operator module;
//! they contain no SQL. Errors are `application/problem+json` (see
//! [`ApiError`]) and never echo database text.

mod auth;
mod error;
mod extract;
mod operations;
mod queues;
mod tasks;
mod templates;
mod views;

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router, middleware};
use sqlx::PgPool;
use utoipa::OpenApi;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, HeaderBuilder, Ref, RefOr, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::{Auth, AuthError, Scope, Token, parse_tokens};
pub use error::{ApiError, FieldError, Problem};
pub use extract::{MAX_BODY_BYTES, MAX_PAGE};
pub use tasks::{CreateTaskBody, MAX_BATCH, MAX_INPUT_BYTES};
pub use views::{Step, Task, TaskSummary, task_body};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// The task routes' connections (see [`crate::lender`]).
    pub db: crate::lender::Lender,
    pub metrics: Metrics,
    /// Templates read by task creation (see [`crate::tasks::TemplateCache`]).
    pub templates: std::sync::Arc<crate::tasks::TemplateCache>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Weft",
        description = "Workflows on PostgreSQL: register templates (DAGs of steps), run them as tasks, \
                       watch and repair them. Errors are application/problem+json documents whose \
                       `errors` name the offending field.",
    ),
    tags(
        (name = "templates", description = "Workflow definitions, immutable per version"),
        (name = "tasks", description = "Runs of a template"),
        (name = "operations", description = "Explaining, cancelling and repairing tasks; queues and dead letters"),
        (name = "meta", description = "This document"),
    ),
    components(schemas(Problem, FieldError)),
)]
struct ApiDoc;

/// Builds the router (health, metrics and `/v1`) for `auth`, with its state.
pub fn router(state: AppState, auth: &Auth) -> Router {
    let (v1, document) = v1(auth);
    // The document of this configuration, serialized once.
    let json = document
        .to_json()
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from_static(b"{}"));
    v1.layer(Extension(OpenApiJson(json)))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The OpenAPI document an API with this `auth` serves.
pub fn openapi(auth: &Auth) -> utoipa::openapi::OpenApi {
    v1(auth).1
}

/// The `/v1` routes and their document, grouped by the scope they need.
fn v1(auth: &Auth) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let read = OpenApiRouter::new()
        .routes(routes!(templates::list_templates))
        .routes(routes!(templates::get_template))
        .routes(routes!(tasks::list_tasks))
        .routes(routes!(tasks::get_task))
        .routes(routes!(operations::explain_task))
        .routes(routes!(operations::task_history))
        .routes(routes!(queues::queues))
        .routes(routes!(queues::dead_letters));
    let write = OpenApiRouter::new()
        .routes(routes!(templates::create_template))
        .routes(routes!(tasks::create_task))
        .routes(routes!(tasks::create_task_batch))
        .routes(routes!(operations::cancel_task));
    let admin = OpenApiRouter::new()
        .routes(routes!(operations::retry_step))
        .routes(routes!(operations::resolve_step))
        .routes(routes!(queues::replay_dead_letter));
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openapi_json))
        .merge(guarded(read, auth, Scope::Read))
        .merge(guarded(write, auth, Scope::Write))
        .merge(guarded(admin, auth, Scope::Admin))
        .split_for_parts();
    if let Auth::Tokens(_) = auth {
        let bearer = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "A token configured on the orchestrator. Scopes nest: admin implies write, \
                 write implies read.",
            ))
            .build();
        document
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(bearer));
    }
    problem_bodies(&mut document);
    (router, document)
}

/// Guards a group of routes with `scope` (when authentication is on), and
/// documents it: the security requirement and the 401/403 responses.
fn guarded(
    mut group: OpenApiRouter<AppState>,
    auth: &Auth,
    scope: Scope,
) -> OpenApiRouter<AppState> {
    let Auth::Tokens(tokens) = auth else {
        return group;
    };
    for item in group.get_openapi_mut().paths.paths.values_mut() {
        for operation in operations_mut(item) {
            operation.security = Some(vec![SecurityRequirement::new("bearer", [scope.as_str()])]);
            let challenge = HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .description(Some(
                    "Bearer, with error and scope when a token was refused",
                ))
                .build();
            let responses = &mut operation.responses.responses;
            responses.insert(
                "401".into(),
                ResponseBuilder::new()
                    .description("No valid bearer token")
                    .header("WWW-Authenticate", challenge.clone())
                    .into(),
            );
            if scope > Scope::Read {
                responses.insert(
                    "403".into(),
                    ResponseBuilder::new()
                        .description(format!("The token's scope is below {scope}"))
                        .header("WWW-Authenticate", challenge)
                        .into(),
                );
            }
        }
    }
    let guard = auth::Guard {
        tokens: tokens.clone(),
        needed: scope,
    };
    group.route_layer(middleware::from_fn_with_state(guard, auth::authorize))
}

fn operations_mut(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// Every error response is a problem document: the annotations list the
/// statuses with a description, and this gives them their body.
fn problem_bodies(document: &mut utoipa::openapi::OpenApi) {
    for item in document.paths.paths.values_mut() {
        for operation in operations_mut(item) {
            for (status, response) in operation.responses.responses.iter_mut() {
                let is_error = status.parse::<u16>().is_ok_and(|s| s >= 400);
                if let (true, RefOr::T(response)) = (is_error, response) {
                    response.content.insert(
                        "application/problem+json".into(),
                        Content::new(Some(Ref::from_schema_name("Problem"))),
                    );
                }
            }
        }
    }
}

/// The serialized OpenAPI document.
#[derive(Clone)]
struct OpenApiJson(Bytes);

/// This document: the API's routes, bodies and errors.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
)]
async fn openapi_json(Extension(OpenApiJson(json)): Extension<OpenApiJson>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response()
}

/// Ready: every background loop is running and the database answers.
async fn ready(State(state): State<AppState>) -> Response {
    if !state.metrics.loops_healthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "background loops not running",
        )
            .into_response();
    }
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

/// Schemas of the string enums of `shared`, which stays free of utoipa: each
/// lists the values of the type's `ALL`, so they cannot drift either.
macro_rules! string_enum_schema {
    ($(#[$doc:meta])* $schema:ident, $name:literal, $values:expr) => {
        $(#[$doc])*
        pub struct $schema;

        impl utoipa::PartialSchema for $schema {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some($values))
                    .into()
            }
        }

        impl utoipa::ToSchema for $schema {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

string_enum_schema!(
    /// `shared::TaskState`.
    TaskStateSchema,
    "TaskState",
    shared::TaskState::ALL.iter().map(|s| s.as_str())
);
string_enum_schema!(
    /// `shared::StepState`.
    StepStateSchema,
    "StepState",
    shared::StepState::ALL.iter().map(|s| s.as_str())
);
string_enum_schema!(
    /// `shared::ExecutionStatus`.
    ExecutionStatusSchema,
    "ExecutionStatus",
    shared::ExecutionStatus::ALL.iter().map(|s| s.as_str())
);
string_enum_schema!(
    /// `shared::OnFailure`.
    OnFailureSchema,
    "OnFailure",
    shared::OnFailure::ALL.iter().map(|s| s.as_str())
);
string_enum_schema!(
    /// `shared::template::Jitter`.
    JitterSchema,
    "Jitter",
    [
        shared::template::Jitter::Full,
        shared::template::Jitter::Equal,
        shared::template::Jitter::None,
    ]
    .map(|j| j.as_str())
);
