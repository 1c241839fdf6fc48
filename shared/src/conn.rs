//! A database connection that a hot loop keeps for its whole life.
//!
//! sqlx's pool pings a connection when it is acquired and again when it is
//! released (sqlx 0.8: `test_before_acquire`, and the release check), so a
//! statement sent through `&PgPool` costs three round trips and wakes the
//! backend three times. The loops on the step path (the orchestrator's
//! collectors and retry scheduler, a worker's reader and completer) run one
//! statement per iteration, thousands a second under load; they hold one
//! connection instead and pay one round trip per statement.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// One connection taken from a pool and kept until an error.
pub struct HeldConnection {
    pool: PgPool,
    conn: Option<PoolConnection<Postgres>>,
}

impl HeldConnection {
    /// Takes nothing yet: the first [`get`](Self::get) acquires.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, conn: None }
    }

    /// The held connection, acquiring one (with the pool's liveness check)
    /// when none is held.
    pub async fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// Lets go of the connection after a failed statement: it may be broken
    /// (the server restarted, the network dropped) or mid-protocol, so it is
    /// closed rather than returned, and the next [`get`](Self::get) takes a
    /// fresh one.
    pub fn discard(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}
