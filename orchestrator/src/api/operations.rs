//! Operator routes on a task: explain, history, cancel, and retrying or
//! resolving a failed step.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use shared::{ExecutionStatus, StepName, StepState, TaskId, TaskState};

use super::error::{ApiError, from_object, invalid, malformed, parse_json, storable};
use super::extract::{Body, PathParams};
use super::views::{Task, task_body, task_id};
use super::{AppState, ExecutionStatusSchema, StepStateSchema, TaskStateSchema};
use crate::operator;
use crate::store;

/// Why a task is in its status: structured, and as one paragraph.
#[derive(Debug, Serialize, ToSchema)]
pub struct Explanation {
    pub task_id: Uuid,
    #[schema(value_type = TaskStateSchema)]
    pub state: TaskState,
    #[schema(value_type = Option<ExecutionStatusSchema>)]
    pub execution_status: Option<ExecutionStatus>,
    pub summary: String,
    /// Steps that can never complete, with their last error.
    pub failed: Vec<FailedStep>,
    pub ready: Vec<String>,
    pub in_flight: Vec<String>,
    /// Pending steps and the dependencies they still wait on.
    pub waiting: Vec<WaitingStep>,
    pub retries: Vec<RetryDue>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FailedStep {
    pub step: String,
    #[schema(value_type = StepStateSchema)]
    pub state: StepState,
    pub error: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WaitingStep {
    pub step: String,
    pub waiting_on: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetryDue {
    pub step: String,
    pub attempt: i32,
    pub due_at: DateTime<Utc>,
    pub due_in_ms: i64,
}

impl From<operator::Explanation> for Explanation {
    fn from(e: operator::Explanation) -> Self {
        let operator::Explanation {
            task_id,
            state,
            execution_status,
            summary,
            failed,
            ready,
            in_flight,
            waiting,
            retries,
        } = e;
        Self {
            task_id: task_id.0,
            state,
            execution_status,
            summary,
            failed: failed
                .into_iter()
                .map(|operator::StepNote { step, state, error }| FailedStep { step, state, error })
                .collect(),
            ready,
            in_flight,
            waiting: waiting
                .into_iter()
                .map(|operator::Waiting { step, waiting_on }| WaitingStep { step, waiting_on })
                .collect(),
            retries: retries
                .into_iter()
                .map(
                    |operator::RetryDue {
                         step,
                         attempt,
                         due_at,
                         due_in_ms,
                     }| RetryDue {
                        step,
                        attempt,
                        due_at,
                        due_in_ms,
                    },
                )
                .collect(),
        }
    }
}

fn not_found(id: TaskId) -> ApiError {
    ApiError::NotFound(format!("task {id} not found"))
}

/// Explains why a task is in its status: which step blocks it, which are
/// ready, how long until a retry.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/explain",
    tag = "operations",
    params(("id" = Uuid, Path, description = "Task id")),
    responses(
        (status = 200, description = "The explanation", body = Explanation),
        (status = 400, description = "The id is not a UUID"),
        (status = 404, description = "No such task"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn explain_task(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Explanation>, ApiError> {
    let id = task_id(&id)?;
    let explanation = operator::explain(&state.pool, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    Ok(Json(explanation.into()))
}

/// One entry of a task's history: a state change of the task or a step, or
/// a result that fencing dropped.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    /// The step, or null for the task's own transitions.
    pub step: Option<String>,
    pub attempt: Option<i32>,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    /// `transition`, `task_transition` or `stale_result`.
    pub kind: String,
    pub reason: Option<String>,
    pub detail: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    /// Oldest first.
    pub items: Vec<HistoryEntry>,
}

/// Shows every state change of a task and its steps.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/history",
    tag = "operations",
    params(("id" = Uuid, Path, description = "Task id")),
    responses(
        (status = 200, description = "The history, oldest first", body = History),
        (status = 400, description = "The id is not a UUID"),
        (status = 404, description = "No such task"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn task_history(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<History>, ApiError> {
    let id = task_id(&id)?;
    if store::get_task(&state.pool, id).await?.is_none() {
        return Err(not_found(id));
    }
    let entries = store::task_history(&state.pool, id).await?;
    let items = entries
        .into_iter()
        .map(
            |store::HistoryEntry {
                 at,
                 step,
                 attempt,
                 from_state,
                 to_state,
                 kind,
                 reason,
                 detail,
             }| HistoryEntry {
                at,
                step,
                attempt,
                from_state,
                to_state,
                kind,
                reason,
                detail,
            },
        )
        .collect();
    Ok(Json(History { items }))
}

/// Optional body of a cancellation.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Recorded in the task's history.
    reason: Option<String>,
}

/// Cancels a task: waiting steps are cancelled, queued messages withdrawn,
/// and results that arrive later are discarded.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/cancel",
    tag = "operations",
    params(("id" = Uuid, Path, description = "Task id")),
    request_body(content = Option<CancelBody>, description = "Optional"),
    responses(
        (status = 200, description = "Cancelled", body = Task),
        (status = 400, description = "The id is not a UUID, or the body is not JSON"),
        (status = 404, description = "No such task"),
        (status = 409, description = "The task already ended"),
        (status = 413, description = "The body exceeds 2 MiB"),
        (status = 422, description = "A field is invalid; `errors` names it"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn cancel_task(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
    Body(body): Body,
) -> Result<Json<Task>, ApiError> {
    let id = task_id(&id)?;
    let body: CancelBody = optional_json(&body)?;
    if body.reason.as_deref().is_some_and(|r| r.contains('\0')) {
        return Err(invalid(
            "reason",
            "text cannot contain the character U+0000 (PostgreSQL cannot store it)",
        ));
    }
    match operator::cancel(&state.pool, id, body.reason.as_deref()).await? {
        None => Err(not_found(id)),
        Some((_, true)) => Ok(Json(task_body(&state.pool, id).await?)),
        Some((task_state, false)) => Err(ApiError::Conflict(format!(
            "task {id} is already {task_state} and cannot be cancelled"
        ))),
    }
}

/// An optional JSON body: empty (or `null`) is the default.
fn optional_json<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    match parse_json::<Value>(body)? {
        Value::Null => Ok(T::default()),
        value => from_object(value),
    }
}

/// A step name from the path; a 400 when it breaks the naming rule.
fn step_name(step: &str) -> Result<(), ApiError> {
    StepName::parse(step)
        .map(drop)
        .map_err(|e| malformed("step", e.to_string()))
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

/// Runs a failed step again, with a fresh budget of attempts.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/steps/{step}/retry",
    tag = "operations",
    params(
        ("id" = Uuid, Path, description = "Task id"),
        ("step" = String, Path, description = "Step name", pattern = "^[a-z][a-z0-9_]{0,62}$"),
    ),
    responses(
        (status = 200, description = "The step runs again", body = Task),
        (status = 400, description = "The id is not a UUID, or the step name breaks its rule"),
        (status = 404, description = "No such task or step"),
        (status = 409, description = "The step has not failed, or the task was cancelled"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn retry_step(
    State(state): State<AppState>,
    PathParams((id, step)): PathParams<(String, String)>,
) -> Result<Json<Task>, ApiError> {
    let id = task_id(&id)?;
    step_name(&step)?;
    let outcome = operator::repair(&state.pool, id, &step, operator::Repair::Retry).await?;
    repaired(outcome, id, &step)?;
    Ok(Json(task_body(&state.pool, id).await?))
}

/// Optional body of a resolution.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// The output the step's dependents receive.
    output: Option<Value>,
}

/// Marks a failed step resolved by hand, so its dependents can run.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/steps/{step}/resolve",
    tag = "operations",
    params(
        ("id" = Uuid, Path, description = "Task id"),
        ("step" = String, Path, description = "Step name", pattern = "^[a-z][a-z0-9_]{0,62}$"),
    ),
    request_body(content = Option<ResolveBody>, description = "Optional"),
    responses(
        (status = 200, description = "The step is resolved", body = Task),
        (status = 400, description = "The id is not a UUID, the step name breaks its rule, or the body is not JSON"),
        (status = 404, description = "No such task or step"),
        (status = 409, description = "The step has not failed, or the task was cancelled"),
        (status = 413, description = "The body exceeds 2 MiB"),
        (status = 422, description = "A field is invalid; `errors` names it"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn resolve_step(
    State(state): State<AppState>,
    PathParams((id, step)): PathParams<(String, String)>,
    Body(body): Body,
) -> Result<Json<Task>, ApiError> {
    let id = task_id(&id)?;
    step_name(&step)?;
    let body: ResolveBody = optional_json(&body)?;
    if let Some(output) = &body.output {
        storable(output, "output")?;
    }
    let action = operator::Repair::Resolve {
        output: body.output,
    };
    let outcome = operator::repair(&state.pool, id, &step, action).await?;
    repaired(outcome, id, &step)?;
    Ok(Json(task_body(&state.pool, id).await?))
}
