//! The reader's wake-ups: LISTEN on the step queue's channel, which the
//! orchestrator notifies when it enqueues steps, with a jittered fallback
//! poll so a lost notification (or a lost connection) costs at most one poll
//! interval, and an idle fleet does almost nothing to the database.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

/// A listener that reconnects and re-LISTENs after errors, with backoff.
pub struct Wake {
    pool: PgPool,
    channel: String,
    listener: Option<PgListener>,
    /// No reconnection attempt before this: a database that refuses
    /// connections is not hammered.
    retry_at: Instant,
    backoff: Backoff,
}

impl Wake {
    pub fn new(pool: PgPool, channel: &str) -> Self {
        Self {
            pool,
            channel: channel.to_owned(),
            listener: None,
            retry_at: Instant::now(),
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        }
    }

    /// Returns when a notification arrives or `timeout` passes, whichever is
    /// first, with the number of notifications taken (a burst is taken at
    /// once; zero after a timeout or a lost connection). Cancel-safe: a
    /// notification not yet taken stays buffered in the listener, so
    /// dropping this future loses nothing.
    pub async fn wait(&mut self, timeout: Duration) -> usize {
        if self.listener.is_none() && Instant::now() >= self.retry_at {
            self.connect().await;
        }
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep(timeout).await;
            return 0;
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Ok(Ok(Some(_))) => {
                let mut taken = 1;
                while listener.next_buffered().is_some() {
                    taken += 1;
                }
                return taken;
            }
            // The connection dropped and notifications may be lost: wake up
            // and read; the listener reconnects and re-LISTENs on its next use.
            Ok(Ok(None)) => debug!("listener connection lost; reconnecting"),
            Ok(Err(e)) => {
                warn!(error = %e, "listener failed; polling until it reconnects");
                self.listener = None;
                self.retry_at = Instant::now() + self.backoff.next_delay();
            }
            Err(_elapsed) => {}
        }
        0
    }

    async fn connect(&mut self) {
        let listener = async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(&self.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listener.await {
            Ok(listener) => {
                info!(channel = %self.channel, "listening for new steps");
                self.listener = Some(listener);
                self.backoff.reset();
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "cannot LISTEN; polling meanwhile");
                self.retry_at = Instant::now() + delay;
            }
        }
    }
}
