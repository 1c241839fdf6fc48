//! The step messages this worker holds, from dispatch until their result is
//! committed: the heartbeat extends their leases, and marks the ones the
//! orchestrator withdrew so their results are not sent.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Entry {
    token: CancellationToken,
    withdrawn: bool,
    /// The read it came in, and when that read was registered.
    read: u64,
    since: Instant,
}

/// Shared by the dispatcher, the completer and the heartbeat; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    entries: Arc<Mutex<HashMap<i64, Entry>>>,
    reads: Arc<AtomicU64>,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single map call), so the data is still good.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts tracking the messages of one read, all before any of their
    /// handlers runs, and returns each one's handler cancellation token;
    /// `None` for a message already held here (it was redelivered to us
    /// while still running, after a lapsed lease).
    pub fn insert_read(&self, msg_ids: &[i64]) -> Vec<Option<CancellationToken>> {
        let read = self.reads.fetch_add(1, Ordering::Relaxed);
        let since = Instant::now();
        let mut map = self.lock();
        msg_ids
            .iter()
            .map(|&msg_id| match map.entry(msg_id) {
                MapEntry::Occupied(_) => None,
                MapEntry::Vacant(slot) => {
                    let token = CancellationToken::new();
                    slot.insert(Entry {
                        token: token.clone(),
                        withdrawn: false,
                        read,
                        since,
                    });
                    Some(token)
                }
            })
            .collect()
    }

    pub fn ids(&self) -> Vec<i64> {
        self.lock().keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Of the messages in `asked`, those missing from `kept` no longer exist
    /// in the queue: they were withdrawn (the task was cancelled) or finished
    /// elsewhere. Cancels their handlers and marks them so their results are
    /// dropped; returns them.
    pub fn withdraw_missing(&self, asked: &[i64], kept: &[i64]) -> Vec<i64> {
        let mut map = self.lock();
        let mut withdrawn = Vec::new();
        for id in asked.iter().filter(|id| !kept.contains(id)) {
            if let Some(entry) = map.get_mut(id).filter(|e| !e.withdrawn) {
                entry.withdrawn = true;
                entry.token.cancel();
                withdrawn.push(*id);
            }
        }
        withdrawn
    }

    /// Whether a sibling of the messages in hand still runs: a message of
    /// the same read, not in hand, not withdrawn, read within `window` of
    /// now (one that has run longer is not about to finish).
    pub fn siblings_running(&self, window: Duration, in_hand: &[i64]) -> bool {
        let map = self.lock();
        let reads: Vec<u64> = in_hand
            .iter()
            .filter_map(|id| map.get(id))
            .map(|e| e.read)
            .collect();
        map.iter().any(|(id, entry)| {
            !entry.withdrawn
                && reads.contains(&entry.read)
                && entry.since.elapsed() <= window
                && !in_hand.contains(id)
        })
    }

    pub fn is_withdrawn(&self, msg_id: i64) -> bool {
        self.lock().get(&msg_id).is_some_and(|e| e.withdrawn)
    }

    pub fn remove(&self, msg_ids: &[i64]) {
        let mut map = self.lock();
        for id in msg_ids {
            map.remove(id);
        }
    }

    /// Tells every running handler to stop (the worker is giving up on them).
    pub fn cancel_all(&self) {
        for entry in self.lock().values() {
            entry.token.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withdrawn_messages_are_cancelled_and_marked() {
        let in_flight = InFlight::default();
        let [one, two] = <[_; 2]>::try_from(in_flight.insert_read(&[1, 2])).unwrap();
        let (one, two) = (one.expect("new"), two.expect("new"));
        assert!(
            in_flight.insert_read(&[1])[0].is_none(),
            "a message is held once"
        );
        assert_eq!(in_flight.withdraw_missing(&[1, 2, 3], &[1]), vec![2]);
        assert!(!one.is_cancelled());
        assert!(two.is_cancelled());
        assert!(in_flight.is_withdrawn(2));
        assert!(!in_flight.is_withdrawn(1));
        // Already withdrawn: not reported twice.
        assert!(in_flight.withdraw_missing(&[2], &[]).is_empty());
        in_flight.remove(&[1, 2]);
        assert!(in_flight.is_empty());
    }

    #[test]
    fn running_siblings_are_told_apart_from_the_ones_in_hand() {
        let in_flight = InFlight::default();
        in_flight.insert_read(&[1, 2]);
        let window = Duration::from_secs(60);
        assert!(
            !in_flight.siblings_running(window, &[1, 2]),
            "only the ones in hand"
        );
        assert!(in_flight.siblings_running(window, &[1]));
        assert!(
            !in_flight.siblings_running(Duration::ZERO, &[1]),
            "not within no time"
        );
        in_flight.insert_read(&[3]);
        assert!(
            !in_flight.siblings_running(window, &[3]),
            "a message of another read is no sibling"
        );
        in_flight.withdraw_missing(&[2], &[]);
        assert!(
            !in_flight.siblings_running(window, &[1]),
            "a withdrawn one is not waited for"
        );
    }
}
