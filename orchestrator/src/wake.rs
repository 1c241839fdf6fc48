//! Wake-ups for the orchestrator's loops: LISTEN/NOTIFY, with a jittered
//! fallback poll so a lost notification (or a lost connection) costs at most
//! one poll interval, and an idle fleet does almost nothing to the database.
//!
//! PostgreSQL (up to 17 at least) signals every backend that LISTENs in a
//! database on every NOTIFY in it, whatever the channel: each listening
//! connection's backend wakes, reads the notification queue and goes back
//! to sleep, about 20 us of CPU and a context switch per connection per
//! notification, all at the instant the notifying transaction commits (a
//! `POST /v1/tasks` notifies the workers; the orchestrator's listeners,
//! waiting for results, woke for it too). So an orchestrator listens on
//! one connection, its [`Hub`], and hands each notification to the loops
//! whose channels it names.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The one LISTEN connection of a process, shared by its loops (see the
/// module's docs). Each [`Wake`] made with [`Wake::shared`] receives the
/// notifications of its channels; when the connection drops, every one is
/// told ([`Woken::Reconnecting`]), since notifications may have been lost.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    pool: PgPool,
    channels: Vec<String>,
    subscribers: Mutex<Vec<Subscriber>>,
    listening: AtomicBool,
}

struct Subscriber {
    channels: Vec<String>,
    tx: mpsc::UnboundedSender<Event>,
}

/// What the hub hands a subscriber.
#[derive(Debug)]
enum Event {
    /// A notification's payload.
    Notified(String),
    /// The connection dropped: notifications may have been lost.
    Lost,
}

impl Hub {
    /// How long the hub waits before connecting again after its listener
    /// failed (the loops poll meanwhile).
    const RETRY: Duration = Duration::from_secs(1);

    /// A hub for `channels`, the only ones its subscribers may ask for.
    pub fn new(pool: PgPool, channels: &[&str]) -> Self {
        Self {
            inner: Arc::new(HubInner {
                pool,
                channels: channels.iter().map(|c| (*c).to_owned()).collect(),
                subscribers: Mutex::default(),
                listening: AtomicBool::new(false),
            }),
        }
    }

    fn subscribers(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        // Pushes and retains leave the list whole: a poisoned lock is still usable.
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn subscribe(&self, channels: &[&str]) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers().push(Subscriber {
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            tx,
        });
        rx
    }

    /// Whether the hub's connection is listening.
    pub fn listening(&self) -> bool {
        self.inner.listening.load(Ordering::Acquire)
    }

    /// Listens until `stop`, reconnecting after failures, and hands every
    /// notification to the subscribers of its channel.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let connected = tokio::select! {
                () = stop.cancelled() => break,
                connected = self.connect() => connected,
            };
            let Some(mut listener) = connected else {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Self::RETRY) => continue,
                }
            };
            self.inner.listening.store(true, Ordering::Release);
            loop {
                let received = tokio::select! {
                    () = stop.cancelled() => break,
                    // Cancel-safe: notifications stay buffered in the listener.
                    received = listener.try_recv() => received,
                };
                match received {
                    Ok(Some(notification)) => {
                        self.hand_out(notification.channel(), notification.payload());
                    }
                    // The connection dropped; the next receive reconnects and
                    // listens again.
                    Ok(None) => {
                        debug!("listener reconnecting");
                        self.tell_all_lost();
                    }
                    Err(e) => {
                        warn!(error = %e, "listener failed; the loops poll until it reconnects");
                        self.inner.listening.store(false, Ordering::Release);
                        self.tell_all_lost();
                        break;
                    }
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        self.inner.listening.store(false, Ordering::Release);
        info!("listener stopped");
    }

    async fn connect(&self) -> Option<PgListener> {
        connect(&self.inner.pool, &self.inner.channels).await
    }

    fn hand_out(&self, channel: &str, payload: &str) {
        self.subscribers().retain(|s| {
            !s.channels.iter().any(|c| c == channel)
                || s.tx.send(Event::Notified(payload.to_owned())).is_ok()
        });
    }

    fn tell_all_lost(&self) {
        self.subscribers()
            .retain(|s| s.tx.send(Event::Lost).is_ok());
    }
}

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

/// Wake-ups on some channels: from a listener of its own, which reconnects
/// lazily after errors, or from a process's [`Hub`].
pub struct Wake {
    source: Source,
    /// What the notifications of the last wake-up named (see [`Wake::named`]).
    named: Option<Vec<i64>>,
}

enum Source {
    Own {
        pool: PgPool,
        channels: Vec<String>,
        listener: Option<PgListener>,
    },
    Shared {
        hub: Hub,
        events: mpsc::UnboundedReceiver<Event>,
    },
}

impl Wake {
    /// Wake-ups from a listener of its own.
    pub fn new(pool: PgPool, channels: &[&str]) -> Self {
        Self {
            source: Source::Own {
                pool,
                channels: channels.iter().map(|c| (*c).to_owned()).collect(),
                listener: None,
            },
            named: None,
        }
    }

    /// Wake-ups from `hub`'s listener when there is one, else from a
    /// listener of its own on `pool`.
    pub fn through(hub: Option<&Hub>, pool: &PgPool, channels: &[&str]) -> Self {
        match hub {
            Some(hub) => Self::shared(hub, channels),
            None => Self::new(pool.clone(), channels),
        }
    }

    /// Wake-ups from `hub`'s listener, for `channels` (among the hub's).
    pub fn shared(hub: &Hub, channels: &[&str]) -> Self {
        Self {
            source: Source::Shared {
                hub: hub.clone(),
                events: hub.subscribe(channels),
            },
            named: None,
        }
    }

    /// Returns when a notification arrives or `timeout` passes, whichever is
    /// first, and which it was. Cancel-safe: dropping the future loses no
    /// notification, since notifications stay buffered in the listener (or
    /// the hub's channel) until taken.
    pub async fn wait(&mut self, timeout: Duration) -> Woken {
        self.named = None;
        let (pool, channels, listener) = match &mut self.source {
            Source::Own {
                pool,
                channels,
                listener,
            } => (pool, channels, listener),
            Source::Shared { events, .. } => {
                let woken = Self::wait_shared(events, timeout).await;
                self.named = woken.1;
                return woken.0;
            }
        };
        if listener.is_none() {
            *listener = connect(pool, channels).await;
        }
        let Some(listening) = listener.as_mut() else {
            tokio::time::sleep(timeout).await;
            return Woken::TimedOut;
        };
        match tokio::time::timeout(timeout, listening.try_recv()).await {
            Ok(Ok(Some(first))) => {
                // Coalesce a burst of notifications into one wake-up.
                let mut named = message_ids(first.payload());
                while let Some(next) = listening.next_buffered() {
                    named = also_named(named, next.payload());
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
                *listener = None;
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

    /// A wait on the hub's channel: the events in hand, coalesced, and the
    /// ids they named.
    async fn wait_shared(
        events: &mut mpsc::UnboundedReceiver<Event>,
        timeout: Duration,
    ) -> (Woken, Option<Vec<i64>>) {
        let first = match tokio::time::timeout(timeout, events.recv()).await {
            Ok(Some(first)) => first,
            // The hub is gone (shutting down): nothing will come.
            Ok(None) => {
                tokio::time::sleep(timeout).await;
                return (Woken::TimedOut, None);
            }
            Err(_elapsed) => return (Woken::TimedOut, None),
        };
        let Event::Notified(payload) = first else {
            return (Woken::Reconnecting, None);
        };
        // Coalesce a burst of notifications into one wake-up; a lost
        // connection among them names nothing (anything may be new).
        let mut named = message_ids(&payload);
        while let Ok(next) = events.try_recv() {
            named = match next {
                Event::Notified(payload) => also_named(named, &payload),
                Event::Lost => None,
            };
        }
        (Woken::Notified, named)
    }

    /// Whether a listener is connected (or was, until its last wait).
    pub fn listening(&self) -> bool {
        match &self.source {
            Source::Own { listener, .. } => listener.is_some(),
            Source::Shared { hub, .. } => hub.listening(),
        }
    }
}

async fn connect(pool: &PgPool, channels: &[String]) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot connect the listener; polling");
            return None;
        }
    };
    let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
    match listener.listen_all(channels).await {
        Ok(()) => Some(listener),
        Err(e) => {
            warn!(error = %e, "cannot LISTEN; polling");
            None
        }
    }
}

/// The ids of a burst so far with those of one more notification's
/// `payload`: `None` once any notification names nothing.
fn also_named(named: Option<Vec<i64>>, payload: &str) -> Option<Vec<i64>> {
    named.zip(message_ids(payload)).map(|(mut a, b)| {
        a.extend(b);
        a
    })
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
