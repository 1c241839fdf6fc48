//! Connections the API lends to one request at a time and takes back as they
//! are.
//!
//! sqlx's pool checks a connection as it is released: dropping a
//! `PoolConnection` spawns a task that pings the server before the
//! connection is pooled again (sqlx 0.8). For the API that is a task, a
//! round trip and a backend wake-up after every request, on a machine busy
//! with the request's own answer. A [`Loan`] whose request finished its
//! statements ([`Loan::settle`]) goes back on a small shelf instead, and the
//! next request takes it from there with no check: it was in use a moment
//! ago (sqlx's own check before use is skipped for a connection idle less
//! than a second, see `src/cli.rs`). A loan dropped unsettled (an error, or
//! the request cancelled mid-statement, which may leave the connection
//! mid-protocol) goes back through sqlx's release check as before.
//!
//! The shelf never hoards: it keeps at most [`Lender::KEEP`] connections,
//! none while the pool has no connection to spare (someone may be waiting
//! for one), and [`Lender::sweep`] returns any that sat on it longer than
//! [`Lender::IDLE_MAX`], so a quiet API holds nothing the rest of the
//! process may need.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lends the pool's connections to the API's requests.
#[derive(Clone)]
pub struct Lender {
    pool: PgPool,
    shelf: Arc<Shelf>,
}

#[derive(Default)]
struct Shelf {
    /// Settled connections, with when each came back; the newest last.
    idle: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
    /// Signalled when a connection is shelved, for the sweeper.
    shelved: Notify,
}

impl Shelf {
    fn lock(&self) -> MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
        // Pushes and pops leave the list whole: a poisoned lock is still usable.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Lender {
    /// Connections kept on the shelf at most.
    pub const KEEP: usize = 4;
    /// How long a connection may sit on the shelf before the sweeper returns
    /// it to the pool.
    pub const IDLE_MAX: Duration = Duration::from_millis(250);

    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            shelf: Arc::default(),
        }
    }

    /// Connections on the shelf now.
    pub fn shelved(&self) -> usize {
        self.shelf.lock().len()
    }

    /// A connection for one request: the one settled last, or one from the
    /// pool (with the pool's checks).
    pub async fn lend(&self) -> Result<Loan, sqlx::Error> {
        let shelved = self.shelf.lock().pop();
        let conn = match shelved {
            Some((conn, since)) if since.elapsed() < Self::IDLE_MAX => conn,
            // The sweeper is late; let the pool check this one.
            stale => {
                drop(stale);
                self.pool.acquire().await?
            }
        };
        Ok(Loan {
            conn: Some(conn),
            lender: self.clone(),
            settled: false,
        })
    }

    /// Returns every connection that sat on the shelf for [`Self::IDLE_MAX`]
    /// to the pool, until `stop`; then all of them.
    pub async fn sweep(self, stop: CancellationToken) {
        loop {
            let oldest = self.shelf.lock().first().map(|(_, since)| *since);
            let due = async {
                match oldest {
                    Some(since) => tokio::time::sleep_until(since + Self::IDLE_MAX).await,
                    None => self.shelf.shelved.notified().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = due => {}
            }
            self.return_idle(Self::IDLE_MAX);
        }
        self.return_idle(Duration::ZERO);
    }

    /// Hands the connections idle for `at_least` back to the pool.
    fn return_idle(&self, at_least: Duration) {
        let now = Instant::now();
        let stale: Vec<_> = {
            let mut idle = self.shelf.lock();
            let fresh = idle.partition_point(|(_, since)| now - *since >= at_least);
            idle.drain(..fresh).collect()
        };
        // Dropped outside the lock: each drop spawns sqlx's release.
        drop(stale);
    }

    /// Whether the pool has a connection to spare for another user: an idle
    /// one, or room to open one. When it has none, someone may be waiting.
    fn pool_can_spare(&self) -> bool {
        self.pool.num_idle() > 0 || self.pool.size() < self.pool.options().get_max_connections()
    }

    /// Shelves a settled connection, or drops it (sqlx releases it) when the
    /// shelf is full or the pool has none to spare.
    fn take_back(&self, conn: PoolConnection<Postgres>) {
        if !self.pool_can_spare() || self.pool.is_closed() {
            return;
        }
        let mut idle = self.shelf.lock();
        if idle.len() < Self::KEEP {
            idle.push((conn, Instant::now()));
            drop(idle);
            self.shelf.shelved.notify_one();
        }
    }
}

/// A connection lent to one request. Dropped after [`Loan::settle`], it goes
/// back on the lender's shelf; dropped without, back to the pool.
pub struct Loan {
    /// Always `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    lender: Lender,
    settled: bool,
}

impl Loan {
    /// The request's statements all completed: the connection is idle, with
    /// no transaction open and nothing in flight, and can be lent as it is.
    pub fn settle(mut self) {
        self.settled = true;
    }
}

impl Deref for Loan {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a loan holds its connection until dropped")
    }
}

impl DerefMut for Loan {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a loan holds its connection until dropped")
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.settled {
            // The shelf keeps it, or drops it for sqlx to release.
            self.lender.take_back(conn);
        }
        // Unsettled, the connection drops here and sqlx's release checks it.
    }
}
