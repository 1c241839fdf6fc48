//! What a handler is: the code a worker runs for a step, looked up by name.
//! A handler receives everything the step message carried plus a
//! cancellation token, and returns an output or a [`StepError`] that says
//! whether running it again may help.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use shared::{StepId, TaskId};
use tokio_util::sync::CancellationToken;

/// One attempt of one step, as its handler sees it.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub task_id: TaskId,
    pub step_id: StepId,
    /// The step's name in its template.
    pub step: String,
    pub namespace: String,
    pub handler: String,
    /// 1-based; later attempts are retries.
    pub attempt: i32,
    /// The step's static configuration from the template.
    pub config: Value,
    /// The task's input.
    pub input: Value,
    /// Outputs of the step's direct dependencies, by step name.
    pub dependencies: BTreeMap<String, Value>,
    /// Cancelled when the task is cancelled, the step times out, or the
    /// worker gives up on the step at shutdown. Long handlers should watch it.
    pub cancellation: CancellationToken,
    /// When the step's timeout expires; the handler is dropped then.
    pub deadline: tokio::time::Instant,
}

/// Why a handler failed, and whether running it again may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// May succeed if run again; not before `retry_after` when given.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Will not succeed if run again.
    #[error("{message}")]
    Permanent { message: String },
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// Retryable, but not before `retry_after` (for example a server's `Retry-After`).
    pub fn retryable_after(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }
}

/// The code run for a step. Plain async functions and closures taking a
/// [`StepContext`] are handlers too, so most code never implements this by hand.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, ctx: StepContext) -> BoxFuture<'static, Result<Value, StepError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    fn call(&self, ctx: StepContext) -> BoxFuture<'static, Result<Value, StepError>> {
        Box::pin(self(ctx))
    }
}

/// Handlers by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// Registers `handler` under `name`, replacing any handler of that name.
    pub fn insert(&mut self, name: impl Into<String>, handler: Arc<dyn Handler>) {
        self.handlers.insert(name.into(), handler);
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.handlers.contains_key(name)
    }

    /// Registered names, sorted: for error messages and logs.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}
