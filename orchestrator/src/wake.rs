//! Wake-ups for the orchestrator's loops: LISTEN/NOTIFY, with a jittered
//! fallback poll so a lost notification (or a lost connection) costs at most
//! one poll interval, and an idle fleet does almost nothing to the database.

use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tracing::{debug, warn};

/// Why [`Wake::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// A notification arrived (a burst counts once).
    Notified,
    /// The timeout passed, or there is no listener to wait on.
    TimedOut,
    /// The listener's connection dropped: notifications may have been lost.
    Reconnecting,
}

/// A listener on some channels that reconnects lazily after errors.
pub struct Wake {
    pool: PgPool,
    channels: Vec<String>,
    listener: Option<PgListener>,
    /// What the notifications of the last wake-up named (see [`Wake::named`]).
    named: Option<Vec<i64>>,
}

impl Wake {
    pub fn new(pool: PgPool, channels: &[&str]) -> Self {
        Self {
            pool,
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            listener: None,
            named: None,
        }
    }

    /// Returns when a notification arrives or `timeout` passes, whichever is
    /// first, and which it was. Cancel-safe: dropping the future loses no
    /// notification, since notifications stay buffered in the listener until
    /// taken.
    pub async fn wait(&mut self, timeout: Duration) -> Woken {
        self.named = None;
        if self.listener.is_none() {
            self.listener = self.connect().await;
        }
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep(timeout).await;
            return Woken::TimedOut;
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Ok(Ok(Some(first))) => {
                // Coalesce a burst of notifications into one wake-up.
                let mut named = message_ids(first.payload());
                while let Some(next) = listener.next_buffered() {
                    named = named.zip(message_ids(next.payload())).map(|(mut a, b)| {
                        a.extend(b);
                        a
                    });
                }
                self.named = named;
                Woken::Notified
            }
            // The connection dropped: notifications may be lost, so wake and
            // poll; the listener reconnects and re-LISTENs on the next call.
            Ok(Ok(None)) => {
                debug!("listener reconnecting");
                Woken::Reconnecting
            }
            Ok(Err(e)) => {
                warn!(error = %e, "listener failed; falling back to polling until it reconnects");
                self.listener = None;
                Woken::Reconnecting
            }
            Err(_elapsed) => Woken::TimedOut,
        }
    }

    /// The message ids the notifications of the last wake-up named, when
    /// every one of them named its messages; `None` after a timeout, or
    /// when one had a payload that is not a list of ids (an empty payload,
    /// the protocol's plain wake-up, names nothing: anything may be new).
    pub fn named(&self) -> Option<&[i64]> {
        self.named.as_deref()
    }

    /// Whether a listener is connected (or was, until its last wait).
    pub fn listening(&self) -> bool {
        self.listener.is_some()
    }

    async fn connect(&self) -> Option<PgListener> {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot connect the listener; polling");
                return None;
            }
        };
        let channels: Vec<&str> = self.channels.iter().map(String::as_str).collect();
        match listener.listen_all(channels).await {
            Ok(()) => Some(listener),
            Err(e) => {
                warn!(error = %e, "cannot LISTEN; polling");
                None
            }
        }
    }
}

/// A notification payload's message ids: decimal ids separated by commas
/// (`shared::queue::complete` sends them), or `None` for any other payload.
fn message_ids(payload: &str) -> Option<Vec<i64>> {
    if payload.is_empty() {
        return None;
    }
    payload.split(',').map(|id| id.parse().ok()).collect()
}

/// `interval` scaled by a random factor in [0.8, 1.2), so a fleet's polls spread out.
pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::message_ids;

    #[test]
    fn a_payload_names_messages_only_when_it_is_a_list_of_ids() {
        assert_eq!(message_ids("17"), Some(vec![17]));
        assert_eq!(message_ids("3,1,2"), Some(vec![3, 1, 2]));
        for payload in ["", ",", "1,", "1,,2", "x", "1, 2", "99999999999999999999"] {
            assert_eq!(message_ids(payload), None, "{payload:?}");
        }
    }
}
