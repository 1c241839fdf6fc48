//! How a worker runs. A plain struct: the binary owns flags and environment
//! variables and fills this in.

use std::time::Duration;

use shared::Namespace;

/// A worker's settings; [`WorkerConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The namespace whose step queue this worker serves.
    pub namespace: Namespace,
    /// Handlers run at once (slots).
    pub concurrency: usize,
    /// How long a read step message stays hidden from other workers without a
    /// heartbeat (pgmq's visibility timeout); whole seconds, at least one.
    pub lease: Duration,
    /// How often the leases of running steps are extended; must be well under
    /// `lease` (it is capped at half of it).
    pub heartbeat: Duration,
    /// Results sent per completion transaction, at most.
    pub batch_size: usize,
    /// How long a result may wait for its running siblings (messages of the
    /// same read, such as the parallel branches of a DAG) read within this
    /// long, so they commit together and the orchestrator applies them in
    /// one batch. Zero: never wait.
    pub completion_linger: Duration,
    /// While results of independent steps stream in (see
    /// [`shared::linger`]), how long a batch of results waits for more to
    /// send in the same transaction. Zero: never wait.
    pub batch_linger: Duration,
    /// Likewise, how long a notified read waits for more steps to take at
    /// once. Zero: never wait.
    pub read_linger: Duration,
    /// Fallback poll when no notification arrives; jittered by ±20%.
    pub poll_interval: Duration,
    /// On shutdown, how long in-flight handlers may still run.
    pub drain_deadline: Duration,
    /// Deliveries of one message without a result before it is dead-lettered.
    pub max_deliveries: i32,
    /// Register `builtin.exec`, which runs commands on this machine.
    pub allow_exec: bool,
    /// Names this worker in results and logs.
    pub worker_id: String,
}

impl WorkerConfig {
    pub fn new(namespace: Namespace) -> Self {
        let lease = Duration::from_secs(30);
        Self {
            namespace,
            concurrency: 16,
            lease,
            heartbeat: lease / 3,
            batch_size: 64,
            completion_linger: Duration::from_millis(1),
            batch_linger: shared::linger::DEFAULT,
            read_linger: shared::linger::DEFAULT,
            poll_interval: Duration::from_secs(1),
            drain_deadline: Duration::from_secs(25),
            max_deliveries: 5,
            allow_exec: false,
            worker_id: default_worker_id(),
        }
    }

    /// The lease as pgmq takes it: whole seconds, at least one.
    pub fn lease_secs(&self) -> i32 {
        i32::try_from(self.lease.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// The heartbeat interval actually used: a heartbeat as long as the lease
    /// would let leases lapse between beats, so it is capped at half the lease.
    pub fn heartbeat_interval(&self) -> Duration {
        let half_lease = Duration::from_secs(u64::from(self.lease_secs().unsigned_abs())) / 2;
        self.heartbeat.clamp(Duration::from_millis(100), half_lease)
    }

    /// Slots, at least one (a zero would never read anything).
    pub fn slots(&self) -> usize {
        self.concurrency.max(1)
    }
}

/// `hostname-pid`: unique among live workers, and meaningful to an operator.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig::new(Namespace::parse("shop").expect("valid namespace"))
    }

    #[test]
    fn defaults() {
        let c = config();
        assert_eq!(c.concurrency, 16);
        assert_eq!(c.lease_secs(), 30);
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(10));
        assert!(c.worker_id.ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn lease_is_whole_seconds_and_heartbeat_fits_in_it() {
        let mut c = config();
        c.lease = Duration::from_millis(300);
        assert_eq!(c.lease_secs(), 1);
        c.heartbeat = Duration::from_secs(10);
        assert_eq!(c.heartbeat_interval(), Duration::from_millis(500));
    }
}
