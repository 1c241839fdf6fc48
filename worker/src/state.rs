//! What a running worker reports about itself: slot use, outcome counters
//! and the last successful database round trip, for health probes and
//! Prometheus. Plain atomics, written by the loops and read by anyone.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::message::Outcome;
use tokio::sync::Semaphore;

use crate::step_metrics::StepMetrics;

#[derive(Debug)]
pub struct WorkerState {
    slots: Arc<Semaphore>,
    slots_total: usize,
    succeeded: AtomicU64,
    failed_retryable: AtomicU64,
    failed_permanent: AtomicU64,
    dead_lettered: AtomicU64,
    withdrawn: AtomicU64,
    db_errors: AtomicU64,
    /// Unix milliseconds of the last successful round trip; 0 for never.
    last_db_ok_ms: AtomicI64,
    draining: AtomicBool,
    steps: StepMetrics,
}

impl WorkerState {
    pub fn new(slots_total: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots_total)),
            slots_total,
            succeeded: AtomicU64::new(0),
            failed_retryable: AtomicU64::new(0),
            failed_permanent: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            withdrawn: AtomicU64::new(0),
            db_errors: AtomicU64::new(0),
            last_db_ok_ms: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            steps: StepMetrics::default(),
        }
    }

    /// Per-step histograms; the dispatcher records into them.
    pub fn step_metrics(&self) -> StepMetrics {
        self.steps.clone()
    }

    /// The semaphore whose permits are the slots; the reader takes them.
    pub(crate) fn slots(&self) -> Arc<Semaphore> {
        Arc::clone(&self.slots)
    }

    pub fn slots_total(&self) -> usize {
        self.slots_total
    }

    /// Slots holding a message: running, waiting to run, or waiting for its
    /// result to be handed to the completer.
    pub fn slots_busy(&self) -> usize {
        self.slots_total
            .saturating_sub(self.slots.available_permits())
    }

    /// Results committed with a success outcome.
    pub fn handled_ok(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Results committed with a failure outcome (retryable or permanent).
    pub fn handled_failed(&self) -> u64 {
        self.failed_retryable.load(Ordering::Relaxed)
            + self.failed_permanent.load(Ordering::Relaxed)
    }

    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }

    pub fn last_db_ok(&self) -> Option<DateTime<Utc>> {
        match self.last_db_ok_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready to take work: not draining, and the database answered within
    /// `max_age` (an idle worker still polls, so this stays fresh; pick a
    /// `max_age` of a few poll intervals).
    pub fn is_ready(&self, max_age: Duration) -> bool {
        let fresh = self.last_db_ok().is_some_and(|at| {
            let age = Utc::now().signed_duration_since(at);
            age.to_std().map_or(true, |age| age <= max_age)
        });
        fresh && !self.is_draining()
    }

    pub(crate) fn db_ok(&self) {
        self.last_db_ok_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub(crate) fn db_error(&self) {
        self.db_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn withdrawn(&self, n: u64) {
        self.withdrawn.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dead_letter(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a committed result.
    pub(crate) fn outcome(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Success { .. } => &self.succeeded,
            Outcome::Retryable { .. } => &self.failed_retryable,
            Outcome::Permanent { .. } => &self.failed_permanent,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "weft_worker_slots",
            "gauge",
            "Handler slots of this worker.",
            &[
                ("{state=\"busy\"}", self.slots_busy() as u64),
                ("{state=\"total\"}", self.slots_total as u64),
            ],
        );
        metric(
            "weft_worker_results_total",
            "counter",
            "Results committed to the result queue, by outcome.",
            &[
                ("{status=\"success\"}", load(&self.succeeded)),
                ("{status=\"retryable\"}", load(&self.failed_retryable)),
                ("{status=\"permanent\"}", load(&self.failed_permanent)),
            ],
        );
        metric(
            "weft_worker_dead_lettered_total",
            "counter",
            "Step messages moved to the dead-letter queue.",
            &[("", load(&self.dead_lettered))],
        );
        metric(
            "weft_worker_withdrawn_total",
            "counter",
            "Running steps withdrawn by the orchestrator (task cancelled); their results were dropped.",
            &[("", load(&self.withdrawn))],
        );
        metric(
            "weft_worker_database_errors_total",
            "counter",
            "Failed database round trips.",
            &[("", load(&self.db_errors))],
        );
        let last_ok = self
            .last_db_ok_ms
            .load(Ordering::Relaxed)
            .max(0)
            .unsigned_abs()
            / 1000;
        metric(
            "weft_worker_last_database_success_seconds",
            "gauge",
            "Unix time of the last successful database round trip (0: never).",
            &[("", last_ok)],
        );
        self.steps.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn counts_and_readiness() {
        let state = WorkerState::new(4);
        assert!(
            !state.is_ready(Duration::from_secs(5)),
            "never reached the database"
        );
        state.db_ok();
        assert!(state.is_ready(Duration::from_secs(5)));
        let _permit = state.slots().try_acquire_owned().expect("a free slot");
        assert_eq!(state.slots_busy(), 1);
        state.outcome(&Outcome::Success {
            output: Value::Null,
        });
        assert_eq!((state.handled_ok(), state.handled_failed()), (1, 0));
        let text = state.render();
        assert!(
            text.contains("weft_worker_slots{state=\"busy\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_worker_results_total{status=\"success\"} 1\n"),
            "{text}"
        );
        state.draining();
        assert!(!state.is_ready(Duration::from_secs(5)));
    }
}
