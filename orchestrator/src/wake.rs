//! Wake-ups for the orchestrator's loops: LISTEN/NOTIFY, with a jittered
//! fallback poll so a lost notification (or a lost connection) costs at most
//! one poll interval, and an idle fleet does almost nothing to the database.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Why [`Wake::wait`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Woke {
    /// Notifications arrived on these channels (a burst counts once).
    Notified(Vec<String>),
    /// The timeout passed.
    TimedOut,
    /// The listener's connection is gone: notifications may have been lost.
    Lost,
}

/// A listener on some channels that reconnects lazily after errors.
pub struct Wake {
    pool: PgPool,
    channels: Vec<String>,
    listener: Option<PgListener>,
}

impl Wake {
    pub fn new(pool: PgPool, channels: &[&str]) -> Self {
        Self {
            pool,
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            listener: None,
        }
    }

    /// Returns when a notification arrives or `timeout` passes, whichever is
    /// first. Cancel-safe: dropping the future loses no notification, since
    /// notifications stay buffered in the listener until taken.
    pub async fn wait(&mut self, timeout: Duration) -> Woke {
        if self.listener.is_none() {
            self.listener = self.connect().await;
        }
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep(timeout).await;
            return Woke::Lost;
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Ok(Ok(Some(first))) => {
                // Coalesce a burst of notifications into one wake-up per channel.
                let mut channels = vec![first.channel().to_owned()];
                while let Some(next) = listener.next_buffered() {
                    if !channels.iter().any(|c| c == next.channel()) {
                        channels.push(next.channel().to_owned());
                    }
                }
                Woke::Notified(channels)
            }
            // The connection dropped: notifications may be lost, so wake and
            // poll; the listener reconnects and re-LISTENs on the next call.
            Ok(Ok(None)) => {
                debug!("listener reconnecting");
                Woke::Lost
            }
            Ok(Err(e)) => {
                warn!(error = %e, "listener failed; falling back to polling until it reconnects");
                self.listener = None;
                Woke::Lost
            }
            Err(_elapsed) => Woke::TimedOut,
        }
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

/// The channel the retry scheduler listens on (see `weft.apply_results`).
pub const RETRIES: &str = "weft_retries";

/// The orchestrator's one LISTEN connection, with a [`Bell`] per channel:
/// the result collectors share `results`, the retry scheduler has `retries`.
/// PostgreSQL signals every listening backend of a database on every
/// NOTIFY, whatever its channels, so each listener connection costs a
/// backend wake-up per notification of the whole fleet.
#[derive(Clone, Debug)]
pub struct Bells {
    pub results: Bell,
    pub retries: Bell,
}

impl Bells {
    /// Starts the listener task; it stops with `stop`.
    pub fn listen(
        pool: PgPool,
        reconnect_every: Duration,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let bells = Self {
            results: Bell::default(),
            retries: Bell::default(),
        };
        let mut wake = Wake::new(pool, &[shared::queue::RESULTS, RETRIES]);
        let ring = bells.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    // Cancel-safe: cancellation is a flag.
                    _ = stop.cancelled() => break,
                    // Cancel-safe: see Wake::wait.
                    woke = wake.wait(reconnect_every) => match woke {
                        Woke::Notified(channels) => {
                            for channel in channels {
                                match channel.as_str() {
                                    shared::queue::RESULTS => ring.results.ring(),
                                    RETRIES => ring.retries.ring(),
                                    other => debug!(channel = other, "notification ignored"),
                                }
                            }
                        }
                        Woke::Lost => {
                            ring.results.ring_all();
                            ring.retries.ring_all();
                        }
                        Woke::TimedOut => {}
                    },
                }
            }
        });
        bells
    }
}

/// Wake-ups for the loops sharing one channel: each notification wakes
/// **one** waiting loop, not all of them: waking every collector for every
/// result would have all but one run an empty batch (a statement, a backend
/// wake-up and a round trip per loop per result). A loop that finds more
/// than one batch of work rings the bell itself ([`Bell::ring`]) to bring
/// in a peer.
///
/// No wake-up is lost: a notification that finds no loop waiting leaves a
/// permit, taken by the next loop to wait, which then reads at once. A
/// lost listener connection wakes every loop (notifications may have been
/// missed), and each loop keeps its own fallback poll.
#[derive(Clone, Debug, Default)]
pub struct Bell {
    notify: Arc<Notify>,
}

impl Bell {
    /// Wakes one waiting loop, or the next one to wait.
    pub fn ring(&self) {
        self.notify.notify_one();
    }

    /// Wakes every waiting loop.
    pub fn ring_all(&self) {
        self.notify.notify_waiters();
    }

    /// Returns when this loop is woken (true) or `timeout` passes (false).
    pub async fn wait(&self, timeout: Duration) -> bool {
        // Cancel-safe: a permit is only consumed when `notified` completes.
        tokio::time::timeout(timeout, self.notify.notified())
            .await
            .is_ok()
    }
}

/// `interval` scaled by a random factor in [0.8, 1.2), so a fleet's polls spread out.
pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use futures_util::FutureExt;

    use super::*;

    fn bell() -> Bell {
        Bell::default()
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_ring_wakes_one_waiting_loop_not_all() {
        let bell = bell();
        let mut first = pin!(bell.wait(LONG));
        let mut second = pin!(bell.wait(LONG));
        // Both are waiting.
        assert!((&mut first).now_or_never().is_none());
        assert!((&mut second).now_or_never().is_none());
        bell.ring();
        let woken = [
            (&mut first).now_or_never().is_some(),
            (&mut second).now_or_never().is_some(),
        ];
        assert_eq!(
            woken,
            [true, false],
            "one ring, one loop woken (the first to wait)"
        );
        bell.ring();
        assert_eq!((&mut second).now_or_never(), Some(true));
    }

    #[tokio::test]
    async fn a_ring_with_no_loop_waiting_is_kept_for_the_next() {
        let bell = bell();
        bell.ring();
        bell.ring();
        // Kept once: a burst is one wake-up, and the loop reads everything.
        assert_eq!(bell.wait(LONG).now_or_never(), Some(true));
        assert!(bell.wait(LONG).now_or_never().is_none());
    }
}
