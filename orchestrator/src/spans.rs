//! Spans that join a task's trace: the trace context travels in the task row
//! and in queue messages, and these spans attach to it, so one task is one
//! trace: `task.create`, then `step.enqueue` and `result.apply` for each step
//! (with the worker's `step.run` in between).

use serde_json::Value;
use tracing::info_span;

use shared::message::{Outcome, ResultMessage};

use crate::store::Enqueued;

/// Records one `step.enqueue` span per enqueued step, under its task's trace.
pub fn enqueued(rows: &[Enqueued]) {
    for row in rows {
        let span = info_span!("step.enqueue", task.id = %row.task_id, step.id = %row.step_id, msg.id = row.msg_id);
        shared::trace::set_parent(&span, row.trace.as_ref());
    }
}

/// Records one `result.apply` span per result, under the handler run that produced it.
pub fn applied(result: &ResultMessage, outcome: &str) {
    let status = match &result.outcome {
        Outcome::Success { .. } => "success",
        Outcome::Retryable { .. } => "retryable",
        Outcome::Permanent { .. } => "permanent",
    };
    let span = info_span!(
        "result.apply",
        task.id = %result.task_id,
        step.id = %result.step_id,
        attempt = result.attempt,
        status,
        outcome,
    );
    shared::trace::set_parent(&span, result.trace.as_ref());
}

/// The root span of a new task's trace and its carried context.
pub fn task_created(task_id: &shared::TaskId, namespace: &str, name: &str) -> Option<Value> {
    let span =
        info_span!(parent: None, "task.create", task.id = %task_id, namespace, template = name);
    shared::trace::inject(&span)
}
