//! The handlers every worker has: `builtin.noop`, `builtin.sleep`,
//! `builtin.fail`, `builtin.http`, and `builtin.exec` when allowed.
//! Bad configuration is a permanent failure whose message names the field.

mod exec;
mod http;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::handler::{Registry, StepContext, StepError};

pub use exec::exec;
pub use http::http;

pub const NOOP: &str = "builtin.noop";
pub const SLEEP: &str = "builtin.sleep";
pub const FAIL: &str = "builtin.fail";
pub const HTTP: &str = "builtin.http";
pub const EXEC: &str = "builtin.exec";

/// Registers the built-ins; `builtin.exec` only when `allow_exec`.
pub fn register(registry: &mut Registry, allow_exec: bool, client: reqwest::Client) {
    registry.insert(
        NOOP,
        Arc::new(|ctx: StepContext| async move { Ok(noop(&ctx)) }),
    );
    registry.insert(SLEEP, Arc::new(sleep));
    registry.insert(FAIL, Arc::new(|ctx: StepContext| async move { fail(&ctx) }));
    registry.insert(
        HTTP,
        Arc::new(move |ctx: StepContext| http(client.clone(), ctx)),
    );
    if allow_exec {
        registry.insert(EXEC, Arc::new(exec));
    }
}

/// The message of an `unknown_handler` failure: what is missing and what to do.
pub fn unknown_handler_message(name: &str, registry: &Registry) -> String {
    if name == EXEC {
        return format!(
            "handler {EXEC} is disabled on this worker: it runs commands, so it must be allowed \
             explicitly (start the worker with --allow-exec or WEFT_ALLOW_EXEC=true)"
        );
    }
    format!(
        "no handler named {name:?} is registered on this worker (registered: {})",
        registry.names().join(", ")
    )
}

/// `builtin.noop`: returns what it was given.
fn noop(ctx: &StepContext) -> Value {
    json!({ "config": ctx.config, "input": ctx.input, "dependencies": ctx.dependencies })
}

/// `builtin.sleep` `{ms}`: sleeps, stopping early when cancelled.
async fn sleep(ctx: StepContext) -> Result<Value, StepError> {
    let config = Config::new(&ctx.config, &["ms"])?;
    let ms = config.required(config.u64("ms")?, "ms", NON_NEGATIVE_INTEGER)?;
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({ "slept_ms": ms })),
        () = ctx.cancellation.cancelled() => Err(StepError::retryable("sleep cancelled")),
    }
}

/// `builtin.fail` `{mode?, times?, retry_after_ms?}`: fails attempts
/// `1..=times` (every attempt when `times` is absent), then behaves like
/// `builtin.noop`. `mode` is `retryable` (the default) or `permanent`.
fn fail(ctx: &StepContext) -> Result<Value, StepError> {
    let config = Config::new(&ctx.config, &["mode", "times", "retry_after_ms"])?;
    let permanent = match config.str("mode")? {
        None | Some("retryable") => false,
        Some("permanent") => true,
        Some(other) => {
            return Err(StepError::permanent(format!(
                "config.mode: expected \"permanent\" or \"retryable\", found {other:?}"
            )));
        }
    };
    let times = config.u64("times")?;
    let retry_after = config.u64("retry_after_ms")?.map(Duration::from_millis);
    let attempt = u64::try_from(ctx.attempt).unwrap_or(0);
    if times.is_some_and(|times| attempt > times) {
        return Ok(noop(ctx));
    }
    let message = match times {
        Some(times) => format!("{FAIL}: failing attempt {attempt} of the first {times} on purpose"),
        None => format!("{FAIL}: failing attempt {attempt} on purpose"),
    };
    Err(match (permanent, retry_after) {
        (true, _) => StepError::permanent(message),
        (false, Some(after)) => StepError::retryable_after(message, after),
        (false, None) => StepError::retryable(message),
    })
}

const NON_NEGATIVE_INTEGER: &str = "a non-negative integer";

/// A built-in's configuration object, read field by field so that every
/// refusal names the field.
pub(crate) struct Config<'a> {
    fields: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> Config<'a> {
    /// Accepts an object (or nothing) whose keys are all in `known`.
    pub(crate) fn new(value: &'a Value, known: &[&str]) -> Result<Self, StepError> {
        let fields = match value {
            Value::Null => None,
            Value::Object(map) => Some(map),
            other => {
                return Err(StepError::permanent(format!(
                    "config: expected an object, found {}",
                    kind(other)
                )));
            }
        };
        if let Some(unknown) = fields
            .into_iter()
            .flat_map(|m| m.keys())
            .find(|k| !known.contains(&k.as_str()))
        {
            return Err(StepError::permanent(format!(
                "config.{unknown}: unknown field (expected one of: {})",
                known.join(", ")
            )));
        }
        Ok(Self { fields })
    }

    /// The field's value; an explicit `null` counts as absent.
    pub(crate) fn get(&self, field: &str) -> Option<&'a Value> {
        self.fields
            .and_then(|m| m.get(field))
            .filter(|v| !v.is_null())
    }

    pub(crate) fn required<T>(
        &self,
        value: Option<T>,
        field: &str,
        expected: &str,
    ) -> Result<T, StepError> {
        value.ok_or_else(|| {
            StepError::permanent(format!("config.{field}: missing, expected {expected}"))
        })
    }

    pub(crate) fn u64(&self, field: &str) -> Result<Option<u64>, StepError> {
        self.typed(field, NON_NEGATIVE_INTEGER, Value::as_u64)
    }

    pub(crate) fn str(&self, field: &str) -> Result<Option<&'a str>, StepError> {
        self.typed(field, "a string", Value::as_str)
    }

    pub(crate) fn typed<T>(
        &self,
        field: &str,
        expected: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, StepError> {
        match self.get(field) {
            None => Ok(None),
            Some(value) => read(value).map(Some).ok_or_else(|| {
                StepError::permanent(format!(
                    "config.{field}: expected {expected}, found {}",
                    kind(value)
                ))
            }),
        }
    }
}

/// How a value is described in a refusal: its JSON kind, plus short scalars verbatim.
pub(crate) fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.len() <= 40 => format!("{s:?}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// The last `max` bytes of `text`, on a character boundary: error messages
/// carry the end of a response or a stderr, where the cause usually is.
pub(crate) fn tail(text: &str, max: usize) -> &str {
    let text = text.trim_end();
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use shared::{StepId, TaskId};
    use tokio_util::sync::CancellationToken;

    use super::*;

    pub(crate) fn ctx(handler: &str, attempt: i32, config: Value) -> StepContext {
        StepContext {
            task_id: TaskId::new(),
            step_id: StepId::new(),
            step: "step".into(),
            namespace: "shop".into(),
            handler: handler.into(),
            attempt,
            config,
            input: json!({"order": 7}),
            dependencies: BTreeMap::from([("validate".to_owned(), json!({"ok": true}))]),
            cancellation: CancellationToken::new(),
            deadline: tokio::time::Instant::now() + Duration::from_secs(60),
        }
    }

    #[test]
    fn noop_returns_what_it_was_given() {
        let out = noop(&ctx(NOOP, 1, json!({"a": 1})));
        assert_eq!(
            out,
            json!({"config": {"a": 1}, "input": {"order": 7}, "dependencies": {"validate": {"ok": true}}})
        );
    }

    #[test]
    fn fail_fails_the_first_times_attempts_then_succeeds() {
        let config = json!({"mode": "retryable", "times": 2, "retry_after_ms": 1500});
        for attempt in 1..=2 {
            assert_eq!(
                fail(&ctx(FAIL, attempt, config.clone())),
                Err(StepError::retryable_after(
                    format!("builtin.fail: failing attempt {attempt} of the first 2 on purpose"),
                    Duration::from_millis(1500)
                ))
            );
        }
        let out = fail(&ctx(FAIL, 3, config.clone())).expect("attempt 3 succeeds");
        assert_eq!(out["config"], config);
    }

    #[test]
    fn fail_modes_and_forever() {
        let permanent = fail(&ctx(FAIL, 1, json!({"mode": "permanent", "times": 1})));
        assert!(matches!(permanent, Err(StepError::Permanent { .. })));
        assert!(fail(&ctx(FAIL, 2, json!({"mode": "permanent", "times": 1}))).is_ok());
        // Without `times` it never succeeds.
        assert_eq!(
            fail(&ctx(FAIL, 99, Value::Null)),
            Err(StepError::retryable(
                "builtin.fail: failing attempt 99 on purpose"
            ))
        );
    }

    #[test]
    fn bad_config_names_the_field() {
        let check = |result: Result<Value, StepError>, expected: &str| {
            assert_eq!(result, Err(StepError::permanent(expected)));
        };
        check(
            fail(&ctx(FAIL, 1, json!({"times": -1}))),
            "config.times: expected a non-negative integer, found -1",
        );
        check(
            fail(&ctx(FAIL, 1, json!({"mode": "sometimes"}))),
            "config.mode: expected \"permanent\" or \"retryable\", found \"sometimes\"",
        );
        check(
            fail(&ctx(FAIL, 1, json!({"retry_after": 5}))),
            "config.retry_after: unknown field (expected one of: mode, times, retry_after_ms)",
        );
        check(
            fail(&ctx(FAIL, 1, json!([1]))),
            "config: expected an object, found an array",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_sleeps_and_checks_its_config() {
        assert_eq!(
            sleep(ctx(SLEEP, 1, json!({"ms": 5000}))).await,
            Ok(json!({"slept_ms": 5000}))
        );
        assert_eq!(
            sleep(ctx(SLEEP, 1, json!({"ms": "soon"}))).await,
            Err(StepError::permanent(
                "config.ms: expected a non-negative integer, found \"soon\""
            ))
        );
        assert_eq!(
            sleep(ctx(SLEEP, 1, json!({}))).await,
            Err(StepError::permanent(
                "config.ms: missing, expected a non-negative integer"
            ))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_honours_cancellation() {
        let ctx = ctx(SLEEP, 1, json!({"ms": 3_600_000}));
        let token = ctx.cancellation.clone();
        let started = tokio::time::Instant::now();
        let sleeping = tokio::spawn(sleep(ctx));
        tokio::time::sleep(Duration::from_secs(1)).await;
        token.cancel();
        let result = sleeping.await.expect("no panic");
        assert_eq!(result, Err(StepError::retryable("sleep cancelled")));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn unknown_handler_messages_say_what_to_do() {
        let mut registry = Registry::default();
        register(&mut registry, false, reqwest::Client::new());
        assert_eq!(
            unknown_handler_message("shop.charge", &registry),
            "no handler named \"shop.charge\" is registered on this worker \
             (registered: builtin.fail, builtin.http, builtin.noop, builtin.sleep)"
        );
        assert!(unknown_handler_message(EXEC, &registry).contains("--allow-exec"));
        register(&mut registry, true, reqwest::Client::new());
        assert!(registry.contains(EXEC));
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abcdef\n", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }
}
