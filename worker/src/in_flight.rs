//! The step messages this worker holds, from dispatch until their result is
//! committed: the heartbeat extends their leases, and marks the ones the
//! orchestrator withdrew so their results are not sent.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Entry {
    token: CancellationToken,
    withdrawn: bool,
    since: Instant,
}

/// Shared by the dispatcher, the completer and the heartbeat; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Mutex<HashMap<i64, Entry>>>);

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single map call), so the data is still good.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts tracking a message and returns its handler's cancellation
    /// token; `None` if the message is already held here (it was redelivered
    /// to us while still running, after a lapsed lease).
    pub fn insert(&self, msg_id: i64) -> Option<CancellationToken> {
        match self.lock().entry(msg_id) {
            MapEntry::Occupied(_) => None,
            MapEntry::Vacant(slot) => {
                let token = CancellationToken::new();
                slot.insert(Entry {
                    token: token.clone(),
                    withdrawn: false,
                    since: Instant::now(),
                });
                Some(token)
            }
        }
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

    /// Whether a message other than `except`, not withdrawn, was dispatched
    /// within `window` of now: a handler started beside the ones whose
    /// results are in hand, likely to finish in a moment if they did.
    pub fn started_within(&self, window: Duration, except: &[i64]) -> bool {
        self.lock().iter().any(|(id, entry)| {
            !entry.withdrawn && entry.since.elapsed() <= window && !except.contains(id)
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
        let one = in_flight.insert(1).expect("new");
        let two = in_flight.insert(2).expect("new");
        assert!(in_flight.insert(1).is_none(), "a message is held once");
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
    fn recent_dispatches_are_told_apart_from_the_ones_in_hand() {
        let in_flight = InFlight::default();
        in_flight.insert(1).expect("new");
        let window = Duration::from_secs(60);
        assert!(
            !in_flight.started_within(window, &[1]),
            "only the one in hand"
        );
        in_flight.insert(2).expect("new");
        assert!(in_flight.started_within(window, &[1]));
        assert!(
            !in_flight.started_within(Duration::ZERO, &[1]),
            "not within no time"
        );
        in_flight.withdraw_missing(&[2], &[]);
        assert!(
            !in_flight.started_within(window, &[1]),
            "a withdrawn one is not waited for"
        );
    }
}
