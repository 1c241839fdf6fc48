//! What task reads return: a task with its steps, as the API shows it
//! (separate from the store's rows, so the two can change apart).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;
use utoipa::ToSchema;
use uuid::Uuid;

use shared::{ExecutionStatus, StepState, TaskId, TaskState};

use super::error::{ApiError, malformed};
use super::{ExecutionStatusSchema, OnFailureSchema, StepStateSchema, TaskStateSchema};
use crate::store;

/// A task without its steps, as listings show it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskSummary {
    pub id: Uuid,
    pub namespace: String,
    pub template_name: String,
    pub template_version: i32,
    #[schema(value_type = TaskStateSchema)]
    pub state: TaskState,
    /// Why the task is where it is; computed when one task is read, null in listings.
    #[schema(value_type = Option<ExecutionStatusSchema>)]
    pub execution_status: Option<ExecutionStatus>,
    #[schema(value_type = OnFailureSchema)]
    pub on_failure: String,
    pub input: Value,
    pub priority: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<store::TaskRow> for TaskSummary {
    fn from(row: store::TaskRow) -> Self {
        let store::TaskRow {
            id,
            namespace,
            template_name,
            template_version,
            state,
            execution_status,
            on_failure,
            input,
            priority,
            created_at,
            started_at,
            finished_at,
        } = row;
        Self {
            id,
            namespace,
            template_name,
            template_version,
            state,
            execution_status,
            on_failure,
            input,
            priority,
            created_at,
            started_at,
            finished_at,
        }
    }
}

/// A task with its steps in declaration order.
#[derive(Debug, Serialize, ToSchema)]
pub struct Task {
    #[serde(flatten)]
    pub task: TaskSummary,
    pub steps: Vec<Step>,
}

/// One step of a task.
#[derive(Debug, Serialize, ToSchema)]
pub struct Step {
    pub id: Uuid,
    pub name: String,
    pub handler: String,
    #[schema(value_type = StepStateSchema)]
    pub state: StepState,
    /// Attempts taken since the step was last reset by an operator.
    pub attempts: i32,
    pub max_attempts: i32,
    pub depends_on: Vec<String>,
    /// Whether it would be enqueued now.
    pub ready: bool,
    pub output: Option<Value>,
    /// `{reason, message, …}` of the last failed attempt.
    pub last_error: Option<Value>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<store::StepRow> for Step {
    fn from(row: store::StepRow) -> Self {
        let store::StepRow {
            id,
            name,
            handler,
            state,
            attempts,
            max_attempts,
            depends_on,
            ready,
            output,
            last_error,
            next_attempt_at,
            enqueued_at,
            finished_at,
        } = row;
        Self {
            id,
            name,
            handler,
            state,
            attempts,
            max_attempts,
            depends_on,
            ready,
            output,
            last_error,
            next_attempt_at,
            enqueued_at,
            finished_at,
        }
    }
}

/// A task with its steps, as every task read returns it.
pub async fn task_body(executor: impl PgExecutor<'_>, id: TaskId) -> Result<Task, ApiError> {
    store::task_view(executor, id)
        .await?
        .map(Task::from)
        .ok_or_else(|| ApiError::NotFound(format!("task {id} not found")))
}

impl From<store::TaskView> for Task {
    fn from(view: store::TaskView) -> Self {
        Self {
            task: view.task.into(),
            steps: view.steps.into_iter().map(Into::into).collect(),
        }
    }
}

/// A task id from the path; a 400 when it is not a UUID.
pub fn task_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse()
        .map_err(|_| malformed("id", "task id must be a UUID"))
}
