//! The orchestrator's counters, rendered as Prometheus text on `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use shared::TaskState;
use shared::queue::QueueStats;
use sqlx::PgPool;

#[derive(Debug, Default)]
struct Counters {
    results_applied: AtomicU64,
    results_stale: AtomicU64,
    results_malformed: AtomicU64,
    retries_enqueued: AtomicU64,
    tasks_complete: AtomicU64,
    tasks_error: AtomicU64,
    tasks_cancelled: AtomicU64,
    db_errors: AtomicU64,
    wakeups_skipped: AtomicU64,
    /// Background loops started and not yet stopped, and how many there should be.
    loops_running: AtomicU64,
    loops_expected: AtomicU64,
    /// The latest queue snapshot, refreshed by the `QueueMonitor`.
    queues: Mutex<Vec<QueueStats>>,
    /// The process's pool, for its gauges.
    pool: OnceLock<PgPool>,
}

/// Cheap to clone; every loop holds one.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Arc<Counters>);

impl Metrics {
    pub fn results(&self, applied: u64, stale: u64, malformed: u64) {
        self.0.results_applied.fetch_add(applied, Ordering::Relaxed);
        self.0.results_stale.fetch_add(stale, Ordering::Relaxed);
        self.0
            .results_malformed
            .fetch_add(malformed, Ordering::Relaxed);
    }

    pub fn retries_enqueued(&self, n: u64) {
        self.0.retries_enqueued.fetch_add(n, Ordering::Relaxed);
    }

    pub fn task_finished(&self, state: TaskState) {
        let counter = match state {
            TaskState::Complete => &self.0.tasks_complete,
            TaskState::Error => &self.0.tasks_error,
            TaskState::Cancelled => &self.0.tasks_cancelled,
            TaskState::Pending | TaskState::Running => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn db_error(&self) {
        self.0.db_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn wakeup_skipped(&self) {
        self.0.wakeups_skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Declares how many background loops this process runs.
    pub fn expect_loops(&self, n: u64) {
        self.0.loops_expected.store(n, Ordering::Relaxed);
    }

    /// Marks a loop running until the guard drops (when the loop returns or panics).
    pub fn loop_running(&self) -> LoopGuard {
        self.0.loops_running.fetch_add(1, Ordering::Relaxed);
        LoopGuard(self.clone())
    }

    /// Whether every expected loop is running: half of readiness.
    pub fn loops_healthy(&self) -> bool {
        self.0.loops_running.load(Ordering::Relaxed)
            >= self.0.loops_expected.load(Ordering::Relaxed)
    }

    /// Replaces the queue snapshot.
    pub fn set_queues(&self, stats: Vec<QueueStats>) {
        if let Ok(mut queues) = self.0.queues.lock() {
            *queues = stats;
        }
    }

    /// Reports this pool's use on `/metrics`.
    pub fn watch_pool(&self, pool: PgPool) {
        let _ = self.0.pool.set(pool);
    }

    pub fn stale_results(&self) -> u64 {
        self.0.results_stale.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let c = &self.0;
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "weft_results_total",
            "Results consumed from the result queue, by what became of them.",
            &[
                ("{outcome=\"applied\"}", load(&c.results_applied)),
                ("{outcome=\"stale\"}", load(&c.results_stale)),
                ("{outcome=\"malformed\"}", load(&c.results_malformed)),
            ],
        );
        counter(
            "weft_stale_results_dropped_total",
            "Late or duplicate results acknowledged and dropped by fencing.",
            &[("", load(&c.results_stale))],
        );
        counter(
            "weft_retries_enqueued_total",
            "Steps enqueued again after their backoff.",
            &[("", load(&c.retries_enqueued))],
        );
        counter(
            "weft_tasks_finished_total",
            "Tasks that reached a final state.",
            &[
                ("{state=\"complete\"}", load(&c.tasks_complete)),
                ("{state=\"error\"}", load(&c.tasks_error)),
                ("{state=\"cancelled\"}", load(&c.tasks_cancelled)),
            ],
        );
        counter(
            "weft_database_errors_total",
            "Failed database round trips in background loops.",
            &[("", load(&c.db_errors))],
        );
        counter(
            "weft_collector_wakeups_skipped_total",
            "Result notifications a collector did not act on: every result they named was taken by a batch of this orchestrator already.",
            &[("", load(&c.wakeups_skipped))],
        );
        if let Ok(queues) = c.queues.lock() {
            let mut gauge = |name: &str, help: &str, value: &dyn Fn(&QueueStats) -> String| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for q in queues.iter() {
                    let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", q.queue_name, value(q));
                }
            };
            gauge("weft_queue_depth", "Messages waiting to be read.", &|q| {
                q.depth.to_string()
            });
            gauge(
                "weft_queue_in_flight",
                "Messages read and leased, not yet deleted.",
                &|q| q.in_flight.to_string(),
            );
            gauge(
                "weft_queue_oldest_message_age_seconds",
                "Age of the oldest message (0 when empty).",
                &|q| q.oldest_age_secs.to_string(),
            );
        }
        if let Some(pool) = c.pool.get() {
            let _ = writeln!(
                out,
                "# HELP weft_db_pool_connections Database connections of this process, by state.\n# TYPE weft_db_pool_connections gauge"
            );
            let idle = pool.num_idle() as u64;
            let size = u64::from(pool.size());
            let _ = writeln!(out, "weft_db_pool_connections{{state=\"idle\"}} {idle}");
            let _ = writeln!(
                out,
                "weft_db_pool_connections{{state=\"busy\"}} {}",
                size.saturating_sub(idle)
            );
            let _ = writeln!(
                out,
                "weft_db_pool_connections{{state=\"max\"}} {}",
                pool.options().get_max_connections()
            );
        }
        out
    }
}

/// Held by a running loop; see [`Metrics::loop_running`].
#[derive(Debug)]
pub struct LoopGuard(Metrics);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        self.0.0.loops_running.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_loop_running() {
        let metrics = Metrics::default();
        metrics.expect_loops(2);
        let first = metrics.loop_running();
        assert!(!metrics.loops_healthy());
        let second = metrics.loop_running();
        assert!(metrics.loops_healthy());
        drop(second);
        assert!(
            !metrics.loops_healthy(),
            "a stopped (or panicked) loop makes the process not ready"
        );
        drop(first);
    }
}
