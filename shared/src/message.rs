//! The queue protocol: step messages (orchestrator to worker) and result
//! messages (worker to orchestrator). This is a versioned wire contract,
//! documented as JSON Schema in `docs/protocol/`; a worker in any language
//! that speaks it can serve a namespace. Never reuse these types as database
//! rows or API bodies.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{StepId, TaskId};

/// The protocol version this build writes and reads.
pub const PROTOCOL_VERSION: u32 = 1;

/// Reasons a failure can carry that the engine itself assigns.
pub mod reason {
    /// The handler returned an error.
    pub const HANDLER_ERROR: &str = "handler_error";
    /// The handler ran past the step's timeout.
    pub const TIMEOUT: &str = "timeout";
    /// No handler of that name is registered on the worker.
    pub const UNKNOWN_HANDLER: &str = "unknown_handler";
    /// The handler panicked.
    pub const HANDLER_PANICKED: &str = "handler_panicked";
    /// The message was delivered too often without a result.
    pub const DELIVERY_ATTEMPTS_EXHAUSTED: &str = "delivery_attempts_exhausted";
    /// The step message could not be decoded.
    pub const MALFORMED_MESSAGE: &str = "malformed_message";
}

/// One attempt of one step, as a worker receives it: everything its handler
/// needs, so workers never read orchestrator tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMessage {
    pub v: u32,
    pub task_id: TaskId,
    pub step_id: StepId,
    /// The step's name in its template.
    pub step: String,
    pub namespace: String,
    pub handler: String,
    /// 1-based; the fencing token the result must carry back.
    pub attempt: i32,
    #[serde(default)]
    pub config: Value,
    #[serde(default)]
    pub input: Value,
    /// Outputs of the step's direct dependencies, by step name.
    #[serde(default)]
    pub dependencies: BTreeMap<String, Value>,
    /// The handler's time budget, counted from when it starts.
    pub timeout_ms: u64,
    /// When the orchestrator enqueued this attempt (for hop latency).
    pub enqueued_at: DateTime<Utc>,
    /// W3C trace context (`traceparent`, `tracestate`) of the task's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Value>,
}

/// A worker's verdict on one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub v: u32,
    pub task_id: TaskId,
    pub step_id: StepId,
    pub attempt: i32,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Which worker ran it, for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Value>,
}

/// How an attempt ended. Whether to retry is part of the type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Success {
        #[serde(default)]
        output: Value,
    },
    /// May succeed if run again; not before `retry_after_ms` when given.
    Retryable {
        error: ErrorInfo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Will not succeed if run again.
    Permanent { error: ErrorInfo },
}

/// A failure's description: a human message and a machine-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub message: String,
    pub reason: String,
}

impl ErrorInfo {
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: reason.to_owned(),
        }
    }
}

/// Why a queue message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is not a JSON object")]
    NotAnObject,
    #[error("message has no protocol version field `v`")]
    MissingVersion,
    #[error("unsupported protocol version {0} (this build speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion(Value),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn decode<T: for<'de> Deserialize<'de>>(value: &Value) -> Result<T, DecodeError> {
    let object = value.as_object().ok_or(DecodeError::NotAnObject)?;
    match object.get("v") {
        None => return Err(DecodeError::MissingVersion),
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(other) => return Err(DecodeError::UnsupportedVersion(other.clone())),
    }
    serde_path_to_error::deserialize(value).map_err(|e| DecodeError::Invalid {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

impl StepMessage {
    /// Decodes and checks a step message; never panics on any input.
    pub fn decode(value: &Value) -> Result<Self, DecodeError> {
        let message: Self = decode(value)?;
        if message.attempt < 1 {
            return Err(DecodeError::Invalid {
                path: "attempt".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(message)
    }
}

impl ResultMessage {
    /// Decodes and checks a result message; never panics on any input.
    pub fn decode(value: &Value) -> Result<Self, DecodeError> {
        let message: Self = decode(value)?;
        if message.attempt < 1 {
            return Err(DecodeError::Invalid {
                path: "attempt".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(message)
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step() -> Value {
        json!({
            "v": 1, "task_id": "0190b3a5-6d1c-7000-8000-000000000001",
            "step_id": "0190b3a5-6d1c-7000-8000-000000000002", "step": "charge",
            "namespace": "shop", "handler": "shop.charge", "attempt": 1,
            "config": {}, "input": {"order": 7}, "dependencies": {"validate": {"ok": true}},
            "timeout_ms": 30000, "enqueued_at": "2026-01-01T00:00:00Z"
        })
    }

    #[test]
    fn step_message_round_trips() {
        let m = StepMessage::decode(&step()).unwrap();
        assert_eq!(m.dependencies["validate"], json!({"ok": true}));
        assert_eq!(
            StepMessage::decode(&serde_json::to_value(&m).unwrap()).unwrap(),
            m
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let check = |value: Value, expected: &str| {
            assert_eq!(
                StepMessage::decode(&value).unwrap_err().to_string(),
                expected
            );
        };
        check(json!([1]), "message is not a JSON object");
        check(
            json!({"task_id": 1}),
            "message has no protocol version field `v`",
        );
        check(
            json!({"v": 2}),
            "unsupported protocol version 2 (this build speaks version 1)",
        );
        let mut bad = step();
        bad["attempt"] = json!("one");
        check(bad, "attempt: invalid type: string \"one\", expected i32");
        let mut bad = step();
        bad["attempt"] = json!(0);
        check(bad, "attempt: must be at least 1");
        let mut bad = step();
        bad.as_object_mut().unwrap().remove("handler");
        check(bad, ".: missing field `handler`");
    }

    #[test]
    fn result_outcomes_are_tagged_by_status() {
        let r = ResultMessage {
            v: 1,
            task_id: TaskId::new(),
            step_id: StepId::new(),
            attempt: 2,
            outcome: Outcome::Retryable {
                error: ErrorInfo::new(reason::TIMEOUT, "ran past 30s"),
                retry_after_ms: Some(500),
            },
            worker: None,
            started_at: None,
            finished_at: None,
            trace: None,
        };
        let v = r.to_value();
        assert_eq!(v["status"], "retryable");
        assert_eq!(v["error"]["reason"], "timeout");
        assert_eq!(v["retry_after_ms"], 500);
        assert_eq!(ResultMessage::decode(&v).unwrap(), r);
    }

    /// Any JSON at all, biased toward message-like objects.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-z0-9_:.-]{0,12}".prop_map(Value::from),
            Just(json!("0190b3a5-6d1c-7000-8000-000000000001")),
            Just(json!("2026-01-01T00:00:00Z")),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let keys = prop_oneof![
                Just("v".to_owned()),
                Just("task_id".to_owned()),
                Just("step_id".to_owned()),
                Just("attempt".to_owned()),
                Just("status".to_owned()),
                Just("error".to_owned()),
                Just("handler".to_owned()),
                Just("dependencies".to_owned()),
                "[a-z]{1,8}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(keys, inner, 0..10)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The decoders never panic, and every refusal is a clean error with a message.
        #[test]
        fn decoders_never_panic(value in any_json(), version in proptest::option::of(0u64..3)) {
            let mut value = value;
            if let (Some(v), Some(object)) = (version, value.as_object_mut()) {
                object.insert("v".into(), json!(v));
            }
            if let Err(e) = StepMessage::decode(&value) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
            if let Err(e) = ResultMessage::decode(&value) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
