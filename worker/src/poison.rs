//! The poison path's payloads: a step message that must not run (delivered
//! too often, or undecodable) is copied whole to the namespace's dead-letter
//! queue, and its step fails permanently when the message says which step it
//! is. The completer commits both with the message's deletion, so it is never
//! lost.

use chrono::Utc;
use serde_json::{Value, json};
use shared::message::{ErrorInfo, Outcome, PROTOCOL_VERSION, ResultMessage, StepMessage};
use shared::queue::{QueueMessage, QueueName};
use shared::{StepId, TaskId};

/// The dead-letter record: the original message, why, and where it came from.
pub fn dead_letter(queue: &QueueName, message: &QueueMessage, reason: &str, detail: &str) -> Value {
    json!({
        "v": PROTOCOL_VERSION,
        "reason": reason,
        "detail": detail,
        "queue": queue.as_str(),
        "msg_id": message.msg_id,
        "read_ct": message.read_ct,
        "message": message.message,
        "dead_lettered_at": Utc::now(),
    })
}

/// A permanent failure for the step the message names, if it names one
/// well enough (a full decode, or else `task_id`, `step_id` and `attempt`
/// read from the raw JSON) for the orchestrator to fence it.
pub fn failure(raw: &Value, reason: &str, detail: &str, worker: &str) -> Option<ResultMessage> {
    let (task_id, step_id, attempt, trace) = match StepMessage::decode(raw) {
        Ok(m) => (m.task_id, m.step_id, m.attempt, m.trace),
        Err(_) => {
            let text = |field: &str| raw.get(field).and_then(Value::as_str);
            let task_id: TaskId = text("task_id")?.parse().ok()?;
            let step_id: StepId = text("step_id")?.parse().ok()?;
            let attempt = i32::try_from(raw.get("attempt")?.as_i64()?)
                .ok()
                .filter(|a| *a >= 1)?;
            (task_id, step_id, attempt, None)
        }
    };
    let now = Utc::now();
    Some(ResultMessage {
        v: PROTOCOL_VERSION,
        task_id,
        step_id,
        attempt,
        outcome: Outcome::Permanent {
            error: ErrorInfo::new(reason, detail),
        },
        worker: Some(worker.to_owned()),
        started_at: Some(now),
        finished_at: Some(now),
        trace,
    })
}

#[cfg(test)]
mod tests {
    use shared::message::reason;

    use super::*;

    #[test]
    fn failure_needs_ids_and_a_valid_attempt() {
        let task = TaskId::new();
        let step = StepId::new();
        let check = |raw: Value, expected: Option<(TaskId, StepId, i32)>| {
            let got = failure(&raw, reason::MALFORMED_MESSAGE, "bad", "w")
                .map(|r| (r.task_id, r.step_id, r.attempt));
            assert_eq!(got, expected, "{raw}");
        };
        check(
            json!({"v": 9, "task_id": task, "step_id": step, "attempt": 2}),
            Some((task, step, 2)),
        );
        check(
            json!({"task_id": task, "step_id": step, "attempt": 0}),
            None,
        );
        check(json!({"task_id": task, "attempt": 1}), None);
        check(
            json!({"task_id": "nope", "step_id": step, "attempt": 1}),
            None,
        );
        check(json!("garbage"), None);
    }
}
