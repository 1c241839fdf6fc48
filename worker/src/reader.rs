//! The `Reader`: claims step messages from the namespace's queue, never more
//! than there are free slots, and hands each one (with its slot) to the
//! dispatcher. It wakes on NOTIFY or a jittered fallback poll, and reads
//! again at once while reads come back full; while steps stream in, a
//! notified read lingers for more (`shared::linger`).

use std::sync::Arc;
use std::time::Duration;

use shared::conn::HeldConnection;
use shared::linger::{self, Linger};
use shared::queue::{self, QueueName};
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Error;
use crate::backoff::{Backoff, jittered};
use crate::config::WorkerConfig;
use crate::dispatcher::Delivery;
use crate::state::WorkerState;
use crate::wake::Wake;

/// Messages per read, at most: bounds one statement's work.
const MAX_READ: usize = 32;

/// What one read did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOutcome {
    pub asked: usize,
    pub read: usize,
}

impl ReadOutcome {
    /// The queue may hold more: read again without waiting.
    pub fn full(&self) -> bool {
        self.asked > 0 && self.read == self.asked
    }
}

pub struct Reader {
    pool: PgPool,
    conn: HeldConnection,
    queue: QueueName,
    lease_secs: i32,
    poll_interval: Duration,
    slots: Arc<Semaphore>,
    linger: Linger,
    deliveries: mpsc::Sender<Delivery>,
    state: Arc<WorkerState>,
}

impl Reader {
    pub fn new(
        pool: PgPool,
        config: &WorkerConfig,
        state: Arc<WorkerState>,
        deliveries: mpsc::Sender<Delivery>,
    ) -> Self {
        Self {
            conn: HeldConnection::new(pool.clone()),
            pool,
            queue: QueueName::steps(&config.namespace),
            lease_secs: config.lease_secs(),
            poll_interval: config.poll_interval,
            slots: state.slots(),
            linger: Linger::new(config.read_linger),
            deliveries,
            state,
        }
    }

    /// Reads until `shutdown`; dropping the dispatch channel on return is
    /// what tells the dispatcher to drain.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut wake = Wake::new(self.pool.clone(), self.queue.channel());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        info!(queue = %self.queue, "reading steps");
        // Whether the read about to run waited, and whether that gathered anything.
        let mut lingered: Option<bool> = None;
        loop {
            // Reading with no free slot would only take messages we cannot run.
            tokio::select! {
                // Cancel-safe: cancellation is a flag.
                () = shutdown.cancelled() => break,
                // Cancel-safe: an unfinished acquire holds no permit. Only the
                // reader takes permits, so a free one stays free until read.
                permit = self.slots.acquire() => drop(permit),
            }
            let outcome = self.run_once().await;
            self.linger.end(std::time::Instant::now(), lingered.take());
            let delay = match outcome {
                Ok(read) if read.full() => {
                    backoff.reset();
                    continue;
                }
                Ok(_) => {
                    backoff.reset();
                    None
                }
                Err(Error::Stopped) => break,
                Err(e) => {
                    self.state.db_error();
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "reading steps failed");
                    Some(delay)
                }
            };
            // After an error, back off; otherwise the queue is drained, so wait
            // for a notification or the fallback poll.
            let pause = async {
                match delay {
                    Some(delay) => {
                        tokio::time::sleep(delay).await;
                        0
                    }
                    None => wake.wait(jittered(self.poll_interval)).await,
                }
            };
            let notified = tokio::select! {
                // Cancel-safe: cancellation is a flag.
                () = shutdown.cancelled() => break,
                // Cancel-safe: a sleep holds nothing, and notifications stay
                // buffered in the listener.
                notified = pause => notified,
            };
            // While steps of independent tasks stream in, one read for
            // several: as many as the free slots can take, at most.
            let enough = self
                .slots
                .available_permits()
                .min(MAX_READ)
                .min(linger::FILL);
            if notified > 0
                && notified < enough
                && let Some(deadline) = self.linger.begin(std::time::Instant::now())
            {
                tokio::select! {
                    // Cancel-safe: cancellation is a flag.
                    () = shutdown.cancelled() => break,
                    // Cancel-safe: as above.
                    gathered = Self::gather(&mut wake, deadline, notified, enough) => lingered = Some(gathered),
                }
            }
        }
        info!("reader stopped");
    }

    /// The batch linger (see [`shared::linger`]): waits until `deadline`, or
    /// until notifications of `enough` enqueues are in hand, for more steps
    /// to take in the same read; whether any came.
    async fn gather(
        wake: &mut Wake,
        deadline: std::time::Instant,
        mut in_hand: usize,
        enough: usize,
    ) -> bool {
        let mut gathered = false;
        while in_hand < enough {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match wake.wait(left).await {
                0 => break,
                taken => {
                    in_hand += taken;
                    gathered = true;
                }
            }
        }
        gathered
    }

    /// Takes the free slots (up to 32) without waiting, reads that
    /// many messages at most (on the connection the reader holds, a fresh
    /// one after a failure), and dispatches what it read.
    pub async fn run_once(&mut self) -> Result<ReadOutcome, Error> {
        let free = self.slots.available_permits().min(MAX_READ);
        let Some(mut permits) = u32::try_from(free)
            .ok()
            .filter(|n| *n > 0)
            .and_then(|n| Arc::clone(&self.slots).try_acquire_many_owned(n).ok())
        else {
            return Ok(ReadOutcome { asked: 0, read: 0 });
        };
        let asked = i32::try_from(free).unwrap_or(i32::MAX);
        let conn = self.conn.get().await?;
        let messages = match queue::read(conn, &self.queue, self.lease_secs, asked).await {
            Ok(messages) => messages,
            Err(e) => {
                self.conn.discard();
                return Err(e.into());
            }
        };
        self.state.db_ok();
        let read = messages.len();
        if read > 0 {
            debug!(read, asked = free, "read steps");
        }
        for message in messages {
            // One permit per message; those left over are freed on return.
            let Some(permit) = permits.split(1) else {
                break;
            };
            self.deliveries
                .send(Delivery { message, permit })
                .await
                .map_err(|_| Error::Stopped)?;
        }
        Ok(ReadOutcome { asked: free, read })
    }
}
