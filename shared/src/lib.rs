//! The contract between Weft's orchestrator and its workers: identifiers,
//! validated names, durable states, the versioned queue protocol, the thin
//! pgmq client, the connection its hot loops hold and the linger by which
//! they batch results, template parsing, and the one migrator.
//!
//! Architecture invariant: this crate holds only what both sides must agree
//! on. It never contains orchestration logic (deciding what runs) or worker
//! logic (running handlers); those live in their own crates.

pub mod conn;
pub mod ids;
pub mod linger;
pub mod message;
pub mod migrate;
pub mod names;
pub mod queue;
pub mod state;
pub mod template;
pub mod trace;

pub use ids::{StepId, TaskId};
pub use names::{HandlerName, Namespace, StepName, TemplateName};
pub use state::{ExecutionStatus, OnFailure, StepState, TaskState};
