//! The Weft worker: serves one namespace's step queue. It claims step
//! messages (never more than it has free slots), runs each one's handler
//! under the step's timeout, and sends the verdict to the result queue,
//! deleting the step message in the same transaction. Reading and completing
//! are two channels: a slow handler never blocks reading, and a slow database
//! never blocks handlers beyond the bounded channels.
//!
//! Architecture invariant: the worker never reads or writes orchestrator
//! tables. Its whole database surface is the pgmq calls in
//! [`shared::queue`]; everything a handler needs travels in the step message.
//!
//! The loops, one per file: [`reader::Reader`] → dispatch channel →
//! [`dispatcher::Dispatcher`] (handlers) → completion channel →
//! [`completer::Completer`]; beside them [`heartbeat::Heartbeat`] keeps the
//! leases of held messages and notices withdrawn ones.

mod backoff;
pub mod builtin;
pub mod completer;
pub mod config;
pub mod dispatcher;
pub mod handler;
pub mod heartbeat;
pub mod in_flight;
mod poison;
pub mod reader;
pub mod state;
pub mod step_metrics;
mod wake;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use shared::HandlerName;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use completer::Completer;
pub use config::WorkerConfig;
pub use dispatcher::{Completion, Delivery, Dispatcher, DispatcherConfig};
pub use handler::{Handler, Registry, StepContext, StepError};
pub use heartbeat::Heartbeat;
pub use in_flight::InFlight;
pub use reader::Reader;
pub use state::WorkerState;

/// After the drain deadline, how long the completer may still take to commit
/// the results of handlers that finished in time. A pod's termination grace
/// period should exceed `drain_deadline` plus this.
pub const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// Why a worker stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The loop a component hands work to has stopped.
    #[error("the worker is stopping")]
    Stopped,
    #[error("the worker's {0} loop stopped unexpectedly")]
    LoopFailed(&'static str),
    #[error(
        "the database pool allows {0} connections (WEFT_DB_MAX_CONNECTIONS), but a worker \
         keeps 3 open (the reader's, its LISTEN, the completer's) and its heartbeat needs \
         one more: allow at least 4"
    )]
    TooFewConnections(u32),
}

/// Collects handlers, then builds a [`Worker`].
pub struct WorkerBuilder {
    config: WorkerConfig,
    registry: Registry,
}

impl WorkerBuilder {
    /// Registers a handler: a [`Handler`], or an async function or closure
    /// taking a [`StepContext`].
    ///
    /// # Panics
    ///
    /// When `name` is not a valid handler name (see [`HandlerName`]), uses
    /// the reserved `builtin.` prefix, or is registered twice: these are
    /// mistakes in the program, found on its first start.
    pub fn handler<H: Handler>(mut self, name: &str, handler: H) -> Self {
        if let Err(e) = HandlerName::parse(name) {
            panic!("cannot register handler: {e}");
        }
        assert!(
            !name.starts_with("builtin."),
            "cannot register handler {name:?}: the builtin. prefix is reserved"
        );
        assert!(
            !self.registry.contains(name),
            "cannot register handler {name:?}: registered twice"
        );
        self.registry.insert(name, Arc::new(handler));
        self
    }

    pub fn build(self) -> Worker {
        let WorkerBuilder {
            config,
            mut registry,
        } = self;
        let client = reqwest::Client::builder()
            .user_agent(concat!("weft-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        builtin::register(&mut registry, config.allow_exec, client);
        let state = Arc::new(WorkerState::new(config.slots()));
        Worker {
            config,
            registry: Arc::new(registry),
            state,
        }
    }
}

/// A worker, ready to run.
pub struct Worker {
    config: WorkerConfig,
    registry: Arc<Registry>,
    state: Arc<WorkerState>,
}

impl Worker {
    pub fn builder(config: WorkerConfig) -> WorkerBuilder {
        WorkerBuilder {
            config,
            registry: Registry::default(),
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Slots, counters and database freshness, for health and metrics
    /// endpoints; live while the worker runs.
    pub fn state(&self) -> Arc<WorkerState> {
        Arc::clone(&self.state)
    }

    /// The registered handler names, built-ins included.
    pub fn handlers(&self) -> Vec<&str> {
        self.registry.names()
    }

    /// Runs until `shutdown` is cancelled, then stops gracefully:
    ///
    /// 1. Stop claiming: the reader stops, and the dispatch channel closes.
    /// 2. Drain: messages already read are still dispatched, and running
    ///    handlers may finish until `drain_deadline`. The heartbeat keeps
    ///    their leases meanwhile.
    /// 3. At the deadline, handlers still running are cancelled and dropped;
    ///    their messages are left to their leases and will be delivered
    ///    again. A message is never deleted unless its result was sent.
    /// 4. The completer commits every result that was produced, within
    ///    [`FLUSH_GRACE`] after the deadline; what it cannot commit by then
    ///    is left to its lease too.
    /// 5. The heartbeat stops, and the messages left behind are logged.
    ///
    /// Returns an error only when one of the loops stopped unexpectedly
    /// (which also triggers this shutdown).
    pub async fn run(self, pool: PgPool, shutdown: CancellationToken) -> Result<(), Error> {
        let Worker {
            config,
            registry,
            state,
        } = self;
        let max_connections = pool.options().get_max_connections();
        if max_connections < 4 {
            return Err(Error::TooFewConnections(max_connections));
        }
        let slots = config.slots();
        let in_flight = InFlight::default();
        let (deliveries_tx, deliveries_rx) = mpsc::channel(slots);
        let (completions_tx, completions_rx) = mpsc::channel(slots * 2);
        // `stop` ends claiming: on shutdown, or when a loop fails.
        let stop = shutdown.child_token();
        let give_up_handlers = CancellationToken::new();
        let give_up_results = CancellationToken::new();
        let stop_heartbeat = CancellationToken::new();
        let failed = Arc::new(OnceLock::new());
        let supervised =
            |name, task| tokio::spawn(supervise(name, task, stop.clone(), Arc::clone(&failed)));

        info!(
            namespace = %config.namespace, worker.id = %config.worker_id, concurrency = slots,
            handlers = ?registry.names(), "worker starting"
        );
        let reader = Reader::new(pool.clone(), &config, Arc::clone(&state), deliveries_tx);
        let dispatcher = Dispatcher::new(
            Arc::clone(&registry),
            DispatcherConfig {
                metrics: state.step_metrics(),
                ..DispatcherConfig::from(&config)
            },
            in_flight.clone(),
            deliveries_rx,
            completions_tx,
        );
        let completer = Completer::new(
            pool.clone(),
            &config,
            in_flight.clone(),
            Arc::clone(&state),
            completions_rx,
        );
        let heartbeat = Heartbeat::new(pool, &config, in_flight.clone(), Arc::clone(&state));
        let reader = supervised("reader", reader.run(stop.clone()).boxed());
        let mut dispatcher = supervised(
            "dispatcher",
            dispatcher.run(give_up_handlers.clone()).boxed(),
        );
        let mut completer = supervised("completer", completer.run(give_up_results.clone()).boxed());
        let heartbeat = supervised("heartbeat", heartbeat.run(stop_heartbeat.clone()).boxed());

        stop.cancelled().await;
        state.draining();
        let deadline = Instant::now() + config.drain_deadline;
        info!(in_flight = in_flight.len(), drain_deadline = ?config.drain_deadline, "worker draining");
        // A JoinError here is a panic that `supervise` already caught and
        // reported, so the handles' results carry nothing more.
        let _ = reader.await;
        tokio::select! {
            _ = &mut dispatcher => {}
            () = tokio::time::sleep_until(deadline) => {
                warn!(running = in_flight.len(), "drain deadline passed; cancelling the handlers still running");
                give_up_handlers.cancel();
                let _ = dispatcher.await;
            }
        }
        tokio::select! {
            _ = &mut completer => {}
            () = tokio::time::sleep_until(deadline.max(Instant::now()) + FLUSH_GRACE) => {
                give_up_results.cancel();
                let _ = completer.await;
            }
        }
        stop_heartbeat.cancel();
        let _ = heartbeat.await;

        let left = in_flight.ids();
        if left.is_empty() {
            info!("worker stopped; every claimed step was completed");
        } else {
            warn!(msg_ids = ?left, "worker stopped; these steps were left to their leases and will run again");
        }
        match failed.get() {
            Some(name) => Err(Error::LoopFailed(name)),
            None => Ok(()),
        }
    }
}

/// Runs one of the worker's loops; a loop that panics, or ends before the
/// worker is stopping, stops the worker instead of leaving it half alive.
async fn supervise(
    name: &'static str,
    task: impl Future<Output = ()>,
    stop: CancellationToken,
    failed: Arc<OnceLock<&'static str>>,
) {
    let panicked = AssertUnwindSafe(task).catch_unwind().await.is_err();
    if panicked || !stop.is_cancelled() {
        error!(
            task = name,
            panicked, "worker loop stopped unexpectedly; stopping the worker"
        );
        let _ = failed.set(name);
        stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use shared::Namespace;

    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig::new(Namespace::parse("shop").expect("valid namespace"))
    }

    async fn charge(ctx: StepContext) -> Result<Value, StepError> {
        Ok(json!({ "charged": ctx.input["order"] }))
    }

    #[tokio::test]
    async fn handlers_register_as_closures_functions_and_trait_objects() {
        struct Refund;
        impl Handler for Refund {
            fn call(
                &self,
                _ctx: StepContext,
            ) -> futures_util::future::BoxFuture<'static, Result<Value, StepError>> {
                Box::pin(async { Err(StepError::permanent("nothing to refund")) })
            }
        }
        let worker = Worker::builder(config())
            .handler(
                "shop.validate",
                |_ctx: StepContext| async move { Ok(json!({})) },
            )
            .handler("shop.charge", charge)
            .handler("shop.refund", Refund)
            .build();
        assert_eq!(
            worker.handlers(),
            [
                "builtin.fail",
                "builtin.http",
                "builtin.noop",
                "builtin.sleep",
                "shop.charge",
                "shop.refund",
                "shop.validate"
            ]
        );
        assert_eq!(worker.state().slots_total(), 16);
        let mut with_exec = config();
        with_exec.allow_exec = true;
        assert!(
            Worker::builder(with_exec)
                .build()
                .handlers()
                .contains(&"builtin.exec")
        );
    }

    #[test]
    fn registration_mistakes_are_refused() {
        let refused = |name: &'static str| {
            std::panic::catch_unwind(|| {
                Worker::builder(config())
                    .handler(name, charge)
                    .handler("shop.charge", charge)
            })
            .is_err()
        };
        assert!(refused("Shop.Charge"));
        assert!(refused("builtin.noop"));
        assert!(refused("shop.charge"), "twice");
        assert!(!refused("shop.other"));
    }
}
