//! Operator actions, each one transaction: cancel a task, retry or resolve a
//! step, replay a dead letter; and `explain`, the reason a task is in its status.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use shared::{ExecutionStatus, StepState, TaskId, TaskState};

use crate::store::{self, ActionOutcome, StoreError};

/// Cancels a task. `None`: no such task.
pub async fn cancel(
    pool: &PgPool,
    id: TaskId,
    reason: Option<&str>,
) -> Result<Option<(TaskState, bool)>, StoreError> {
    store::cancel_task(pool, id, reason).await
}

/// Retries or resolves a step, then enqueues what became ready and
/// re-evaluates the task, in one transaction.
pub async fn repair(
    pool: &PgPool,
    id: TaskId,
    step: &str,
    action: Repair,
) -> Result<ActionOutcome, StoreError> {
    let mut tx = pool.begin().await?;
    let (forced, outcome) = match &action {
        Repair::Retry => store::retry_step(&mut *tx, id, step).await?,
        Repair::Resolve { output } => (
            None,
            store::resolve_step(&mut *tx, id, step, output.as_ref()).await?,
        ),
    };
    if outcome != ActionOutcome::Applied {
        tx.rollback().await?;
        return Ok(outcome);
    }
    let forced: Vec<Uuid> = forced.into_iter().collect();
    store::enqueue_ready_steps_forcing(&mut *tx, &[id.0], &forced).await?;
    store::finalize_tasks(&mut *tx, &[id.0]).await?;
    tx.commit().await?;
    Ok(outcome)
}

#[derive(Debug, Clone)]
pub enum Repair {
    Retry,
    Resolve { output: Option<Value> },
}

/// What replaying a dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The step runs again as a new attempt in its place in the DAG.
    Step {
        task_id: TaskId,
        step: String,
    },
    NotFound,
    Refused(String),
}

/// Replays a dead letter: its step gets a fresh attempt (a retry of the step
/// it failed), and the dead letter is removed, in one transaction.
pub async fn replay_dead_letter(
    pool: &PgPool,
    queue: &str,
    msg_id: i64,
) -> Result<Replayed, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(letter) = store::take_dead_letter(&mut *tx, queue, msg_id).await? else {
        return Ok(Replayed::NotFound);
    };
    let original = &letter.message["message"];
    let ids = (
        original
            .get("task_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Uuid>().ok()),
        original
            .get("step_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Uuid>().ok()),
    );
    let (Some(task_id), Some(step_id)) = ids else {
        return Ok(Replayed::Refused(
            "the dead letter names no step to run again".into(),
        ));
    };
    let Some(step) = store::step_name(&mut *tx, TaskId(task_id), step_id).await? else {
        return Ok(Replayed::Refused(
            "the dead letter's step no longer exists".into(),
        ));
    };
    match store::retry_step(&mut *tx, TaskId(task_id), &step).await?.1 {
        ActionOutcome::Applied => {}
        ActionOutcome::Refused(reason) => {
            return Ok(Replayed::Refused(format!(
                "step {step} cannot run again: {}",
                reason.replace('_', " ")
            )));
        }
        ActionOutcome::NotFound(what) => return Ok(Replayed::Refused(what)),
    }
    store::enqueue_ready_steps_forcing(&mut *tx, &[task_id], &[step_id]).await?;
    store::finalize_tasks(&mut *tx, &[task_id]).await?;
    tx.commit().await?;
    Ok(Replayed::Step {
        task_id: TaskId(task_id),
        step,
    })
}

/// Why a task is in its status: structured, and as one paragraph.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub task_id: TaskId,
    pub state: TaskState,
    pub execution_status: Option<ExecutionStatus>,
    pub summary: String,
    /// Steps that can never complete, with their last error.
    pub failed: Vec<StepNote>,
    pub ready: Vec<String>,
    pub in_flight: Vec<String>,
    /// Pending steps and the dependencies they still wait on.
    pub waiting: Vec<Waiting>,
    pub retries: Vec<RetryDue>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepNote {
    pub step: String,
    pub state: StepState,
    pub error: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Waiting {
    pub step: String,
    pub waiting_on: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryDue {
    pub step: String,
    pub attempt: i32,
    pub due_at: DateTime<Utc>,
    pub due_in_ms: i64,
}

/// Explains a task. `None`: no such task.
pub async fn explain(pool: &PgPool, id: TaskId) -> Result<Option<Explanation>, StoreError> {
    let Some(store::TaskView { task, steps }) = store::task_view(pool, id).await? else {
        return Ok(None);
    };
    let now = Utc::now();
    let by_name: std::collections::HashMap<&str, &store::StepRow> =
        steps.iter().map(|s| (s.name.as_str(), s)).collect();
    let failed: Vec<StepNote> = steps
        .iter()
        .filter(|s| {
            matches!(s.state, StepState::Error | StepState::Cancelled)
                || (s.state == StepState::WaitingRetry && s.attempts >= s.max_attempts)
        })
        .map(|s| StepNote {
            step: s.name.clone(),
            state: s.state,
            error: s.last_error.clone(),
        })
        .collect();
    let ready: Vec<String> = steps
        .iter()
        .filter(|s| s.ready)
        .map(|s| s.name.clone())
        .collect();
    let in_flight: Vec<String> = steps
        .iter()
        .filter(|s| s.state == StepState::Enqueued)
        .map(|s| s.name.clone())
        .collect();
    let waiting: Vec<Waiting> = steps
        .iter()
        .filter(|s| s.state == StepState::Pending && !s.ready)
        .map(|s| Waiting {
            step: s.name.clone(),
            waiting_on: s
                .depends_on
                .iter()
                .filter(|d| {
                    by_name
                        .get(d.as_str())
                        .is_some_and(|dep| !dep.state.satisfies_dependents())
                })
                .cloned()
                .collect(),
        })
        .collect();
    let retries: Vec<RetryDue> = steps
        .iter()
        .filter(|s| s.state == StepState::WaitingRetry && s.attempts < s.max_attempts)
        .filter_map(|s| {
            s.next_attempt_at.map(|due| RetryDue {
                step: s.name.clone(),
                attempt: s.attempts + 1,
                due_at: due,
                due_in_ms: (due - now).num_milliseconds().max(0),
            })
        })
        .collect();
    let summary = summarize(&task, &failed, &ready, &in_flight, &waiting, &retries);
    Ok(Some(Explanation {
        task_id: id,
        state: task.state,
        execution_status: task.execution_status,
        summary,
        failed,
        ready,
        in_flight,
        waiting,
        retries,
    }))
}

fn list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn error_text(error: &Option<Value>) -> String {
    match error {
        Some(e) => format!(
            "{}: {}",
            e.get("reason").and_then(Value::as_str).unwrap_or("error"),
            e.get("message").and_then(Value::as_str).unwrap_or("")
        ),
        None => "no error recorded".into(),
    }
}

fn summarize(
    task: &store::TaskRow,
    failed: &[StepNote],
    ready: &[String],
    in_flight: &[String],
    waiting: &[Waiting],
    retries: &[RetryDue],
) -> String {
    let mut parts = vec![format!("Task {} is {}", task.id, task.state)];
    match task.execution_status {
        Some(ExecutionStatus::BlockedByFailures) => {
            let failures: Vec<String> = failed
                .iter()
                .map(|f| format!("`{}` ({}, {})", f.step, f.state, error_text(&f.error)))
                .collect();
            parts.push(format!(
                "and blocked by failures: {} cannot complete",
                failures.join("; ")
            ));
            if task.on_failure == "fail_fast" {
                if !in_flight.is_empty() {
                    parts.push(format!(
                        "Nothing new is enqueued (fail_fast); it ends in error once {} finish",
                        list(in_flight)
                    ));
                } else if !ready.is_empty() {
                    parts.push(format!(
                        "{} would be ready but stay blocked (fail_fast)",
                        list(ready)
                    ));
                }
            } else if !ready.is_empty() || !in_flight.is_empty() {
                parts.push("independent branches keep running (on_failure: continue)".into());
            }
            if !task.state.is_terminal() || task.state == TaskState::Error {
                parts.push("Retry or resolve the failed steps to let it continue".into());
            }
        }
        Some(ExecutionStatus::HasReadySteps) => {
            parts.push(format!("and has ready steps: {}", list(ready)))
        }
        Some(ExecutionStatus::Processing) => {
            parts.push(format!("and processing: {} in flight", list(in_flight)))
        }
        Some(ExecutionStatus::AllComplete) => parts.push("and every step is complete".into()),
        Some(ExecutionStatus::WaitingForDependencies) | None => {
            if !retries.is_empty() {
                let due: Vec<String> = retries
                    .iter()
                    .map(|r| format!("`{}` attempt {} in {} ms", r.step, r.attempt, r.due_in_ms))
                    .collect();
                parts.push(format!("and waiting for retries: {}", due.join(", ")));
            } else {
                parts.push("and waiting for dependencies".into());
            }
        }
    }
    if !waiting.is_empty() && !task.state.is_terminal() {
        let w: Vec<String> = waiting
            .iter()
            .filter(|w| !w.waiting_on.is_empty())
            .map(|w| format!("`{}` waits on {}", w.step, list(&w.waiting_on)))
            .collect();
        if !w.is_empty() {
            parts.push(w.join("; "));
        }
    }
    let mut text = parts.remove(0);
    if let Some(first) = parts.first() {
        text.push(' ');
        text.push_str(first);
    }
    for p in parts.iter().skip(1) {
        text.push_str(". ");
        text.push_str(p);
    }
    text.push('.');
    text
}
