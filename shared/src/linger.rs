//! The batch linger: whether the first message of a batch (a step to read,
//! a result to send or apply) waits for others to share its statement, and
//! for how long. The hot loops on both sides of the queue protocol use it:
//! a worker's reader and completer, an orchestrator's lead collector.
//!
//! A transaction's cost is mostly fixed (statement start-up, locks, the
//! commit's WAL flush, a notification and the wake-ups it causes), so when
//! steps and results of independent tasks stream in, a few milliseconds of
//! waiting turns a transaction per message into one per several, and the
//! CPU saved goes to the work itself. Waiting is worth it only when
//! companions come:
//! - after a quiet spell longer than the linger, the batch goes at once
//!   (sparse traffic: nothing would join, and a lone message is not delayed);
//! - it waits while waiting pays: the last wait gathered something;
//! - a wait that gathered nothing (messages that follow one another, such
//!   as the hops of one chain, each waiting for the last to be applied)
//!   stops the waiting, which is tried again only after
//!   [`PROBE_EVERY_LINGERS`] lingers' time, at least [`MIN_PROBE_INTERVAL`]:
//!   such a chain pays the linger on one hop in a hundred at most.
//!
//! A wait also ends as soon as [`FILL`] messages are in hand: under heavy
//! load a batch fills in far less than the linger.

use std::time::{Duration, Instant};

/// The linger both sides use unless configured (`WEFT_BATCH_LINGER`).
pub const DEFAULT: Duration = Duration::from_millis(20);

/// Messages in hand that end a wait early: a transaction of this many
/// already spreads its fixed cost thin.
pub const FILL: usize = 16;

/// A wait that gathered nothing is tried again after this many lingers…
pub const PROBE_EVERY_LINGERS: u32 = 100;

/// …and not sooner than this.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// One loop's linger state. Not shared: each loop judges its own stream.
#[derive(Debug, Clone)]
pub struct Linger {
    max: Duration,
    /// When the loop's last transaction ended (the start of the quiet spell).
    last_end: Option<Instant>,
    /// Whether the last wait gathered anything.
    paying: bool,
    /// When a wait may be tried after one that gathered nothing.
    next_probe: Option<Instant>,
}

impl Linger {
    /// `max` zero never waits.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            last_end: None,
            paying: false,
            next_probe: None,
        }
    }

    /// A batch's first message is in hand at `now`: until when to wait for
    /// more, or `None` to go at once.
    pub fn begin(&mut self, now: Instant) -> Option<Instant> {
        if self.max.is_zero() {
            return None;
        }
        let quiet = now.saturating_duration_since(self.last_end?);
        if quiet > self.max {
            return None;
        }
        if !self.paying {
            if self.next_probe.is_some_and(|probe| now < probe) {
                return None;
            }
            let interval = (self.max * PROBE_EVERY_LINGERS).max(MIN_PROBE_INTERVAL);
            self.next_probe = Some(now + interval);
        }
        Some(now + self.max)
    }

    /// The batch's transaction ended at `now`; `waited` is what its wait
    /// gathered: `None` when it did not wait, else whether anything came.
    pub fn end(&mut self, now: Instant, waited: Option<bool>) {
        self.last_end = Some(now);
        if let Some(gathered) = waited {
            self.paying = gathered;
        }
    }

    /// Whether `in_hand` messages end a wait.
    pub fn full(in_hand: usize) -> bool {
        in_hand >= FILL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_zero_linger_never_waits() {
        let mut linger = Linger::new(Duration::ZERO);
        let t = Instant::now();
        linger.end(t, None);
        assert_eq!(linger.begin(t + ms(1)), None);
    }

    #[test]
    fn the_first_batch_and_one_after_a_quiet_spell_go_at_once() {
        let mut linger = Linger::new(MAX);
        let t = Instant::now();
        assert_eq!(linger.begin(t), None, "nothing known yet");
        linger.end(t, None);
        assert_eq!(
            linger.begin(t + ms(11)),
            None,
            "quiet for longer than the linger"
        );
    }

    #[test]
    fn a_stream_waits_while_waiting_gathers_something() {
        let mut linger = Linger::new(MAX);
        let t = Instant::now();
        linger.end(t, None);
        let first = t + ms(2);
        assert_eq!(linger.begin(first), Some(first + MAX), "a probe");
        linger.end(first + ms(11), Some(true));
        for i in 1..50u64 {
            let now = first + ms(13 * i);
            assert_eq!(linger.begin(now), Some(now + MAX), "wait {i} pays");
            linger.end(now + ms(11), Some(true));
        }
    }

    #[test]
    fn a_wait_that_gathers_nothing_stops_the_waiting_until_the_next_probe() {
        let mut linger = Linger::new(MAX);
        let t = Instant::now();
        linger.end(t, None);
        let probe = t + ms(2);
        assert!(linger.begin(probe).is_some());
        linger.end(probe + ms(11), Some(false));
        // A chain: each hop follows the last within the linger.
        let mut now = probe + ms(13);
        while now < probe + ms(999) {
            assert_eq!(
                linger.begin(now),
                None,
                "no wait {:?} after the probe",
                now - probe
            );
            linger.end(now + ms(1), None);
            now += ms(3);
        }
        let next = probe + MIN_PROBE_INTERVAL;
        linger.end(next - ms(1), None);
        assert_eq!(linger.begin(next), Some(next + MAX), "the next probe");
        linger.end(next + ms(11), Some(true));
        assert!(linger.begin(next + ms(12)).is_some(), "that one paid");
    }

    #[test]
    fn a_long_linger_probes_a_hundred_lingers_apart() {
        let max = Duration::from_secs(2);
        let mut linger = Linger::new(max);
        let t = Instant::now();
        linger.end(t, None);
        assert!(linger.begin(t).is_some());
        linger.end(t + max, Some(false));
        let before = t + max * 99;
        linger.end(before - ms(1), None);
        assert_eq!(linger.begin(before), None);
        let after = t + max * 100;
        linger.end(after - ms(1), None);
        assert!(linger.begin(after).is_some());
    }

    #[test]
    fn a_batch_of_sixteen_is_full() {
        assert!(!Linger::full(FILL - 1));
        assert!(Linger::full(FILL));
    }
}
