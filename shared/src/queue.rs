//! Queue names and a thin typed client over pgmq's queue tables.
//!
//! Every function takes `impl PgExecutor` so callers put queue operations in
//! the same transaction as their state changes (the transactional outbox).
//! This is the whole of a worker's database surface.
//!
//! The statements are pgmq's own (`pgmq.read`, `pgmq.send_batch`,
//! `pgmq.delete`, `pgmq.set_vt`) run directly on the queue table instead of
//! through those functions: the functions build their SQL with `format` and
//! `EXECUTE`, so PostgreSQL plans it again on every call (0.3-0.4 ms each,
//! several times what executing it costs), while a statement sent here is
//! prepared once per connection. This ties Weft to pgmq's table layout, which
//! is why the pgmq version is pinned and checked by the migrator.

use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;

use crate::names::Namespace;

/// The queue every worker sends results to.
pub const RESULTS: &str = "weft_results";

/// A pgmq queue name that Weft uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueName(String);

impl QueueName {
    /// The namespace's step queue.
    pub fn steps(namespace: &Namespace) -> Self {
        Self(format!("weft_steps_{namespace}"))
    }

    /// The namespace's dead-letter queue.
    pub fn dead_letters(namespace: &Namespace) -> Self {
        Self(format!("weft_dlq_{namespace}"))
    }

    /// Where result messages that cannot be decoded are kept.
    pub fn results_dead_letters() -> Self {
        Self("weft_results_dlq".to_owned())
    }

    /// The shared result queue.
    pub fn results() -> Self {
        Self(RESULTS.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The queue's pgmq table, quoted (`pgmq.format_table_name`: `q_` and
    /// the name; Weft's names are lowercase identifiers already).
    fn table(&self) -> String {
        format!("pgmq.\"q_{}\"", self.0)
    }

    /// The LISTEN/NOTIFY channel the orchestrator notifies when it sends to this queue.
    pub fn channel(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message read from a queue.
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct QueueMessage {
    pub msg_id: i64,
    /// How many times it has been read, this read included.
    pub read_ct: i32,
    pub enqueued_at: DateTime<Utc>,
    pub message: Value,
}

/// Reads up to `qty` visible messages and hides them for `lease_secs` (the lease).
///
/// The lease commits without waiting for its WAL flush
/// (`synchronous_commit = off` for this statement's transaction only; the
/// callers run it on its own). Losing a lease to a database crash only
/// makes its messages visible again early: delivery is at least once
/// anyway, results are fenced by attempt, and the completion that deletes a
/// message is a durable commit, whose flush covers the lease before it. A
/// durable lease would be one of four WAL flushes in a one-step task's
/// life, and the flush is what every committing transaction queues for.
pub async fn read(
    executor: impl PgExecutor<'_>,
    queue: &QueueName,
    lease_secs: i32,
    qty: i32,
) -> Result<Vec<QueueMessage>, sqlx::Error> {
    let table = queue.table();
    let sql = format!(
        "with cte as (
             select msg_id, set_config('synchronous_commit', 'off', true)
             from {table}
             where vt <= clock_timestamp()
             order by msg_id
             limit $1
             for update skip locked
         )
         update {table} m
            set last_read_at = clock_timestamp(),
                vt = clock_timestamp() + make_interval(secs => $2),
                read_ct = read_ct + 1
           from cte
          where m.msg_id = cte.msg_id
         returning m.msg_id, m.read_ct, m.enqueued_at, m.message"
    );
    let mut messages: Vec<QueueMessage> = sqlx::query_as(&sql)
        .bind(qty)
        .bind(lease_secs)
        .fetch_all(executor)
        .await?;
    // UPDATE ... RETURNING gives no order; consumers get the oldest first.
    messages.sort_unstable_by_key(|m| m.msg_id);
    Ok(messages)
}

/// Sends messages in one statement and notifies the queue's listeners on commit.
pub async fn send_batch(
    executor: impl PgExecutor<'_>,
    queue: &QueueName,
    messages: &[Value],
) -> Result<Vec<i64>, sqlx::Error> {
    let sql = format!(
        "with sent as (
             insert into {} (vt, message)
             select clock_timestamp(), m from unnest($1::jsonb[]) as u(m)
             returning msg_id
         )
         select sent.msg_id from sent, (select pg_notify($2, '')) as notified",
        queue.table()
    );
    sqlx::query_scalar(&sql)
        .bind(messages)
        .bind(queue.channel())
        .fetch_all(executor)
        .await
}

/// Deletes messages; returns the ids that existed.
pub async fn delete_batch(
    executor: impl PgExecutor<'_>,
    queue: &QueueName,
    msg_ids: &[i64],
) -> Result<Vec<i64>, sqlx::Error> {
    let sql = format!(
        "delete from {} where msg_id = any($1) returning msg_id",
        queue.table()
    );
    sqlx::query_scalar(&sql)
        .bind(msg_ids)
        .fetch_all(executor)
        .await
}

/// A worker's usual completion in one statement (one round trip, atomic
/// without an explicit transaction): deletes the step messages `msg_ids`
/// from `steps` and sends `results` to `results_queue`, notifying its
/// listeners when there are any. The notification names the results' message
/// ids (comma-separated; empty past [`NAMED_IN_A_NOTIFICATION`]), so a
/// collector that already applied them skips the wake-up. Returns how many
/// step messages existed.
pub async fn complete(
    executor: impl PgExecutor<'_>,
    steps: &QueueName,
    msg_ids: &[i64],
    results_queue: &QueueName,
    results: &[Value],
) -> Result<i64, sqlx::Error> {
    let sql = format!(
        "with deleted as (
             delete from {} where msg_id = any($1) returning msg_id
         ),
         sent as (
             insert into {} (vt, message)
             select clock_timestamp(), m from unnest($2::jsonb[]) as u(m)
             returning msg_id
         )
         select (select count(*) from deleted),
                (select count(*) from sent),
                (select count(*) from (select pg_notify($3, (
                                           select case when count(*) <= $4
                                                       then string_agg(msg_id::text, ',' order by msg_id)
                                                       else '' end
                                             from sent))
                                       where cardinality($2::jsonb[]) > 0) n)",
        steps.table(),
        results_queue.table()
    );
    let (deleted, _sent, _notified): (i64, i64, i64) = sqlx::query_as(&sql)
        .bind(msg_ids)
        .bind(results)
        .bind(results_queue.channel())
        .bind(NAMED_IN_A_NOTIFICATION)
        .fetch_one(executor)
        .await?;
    Ok(deleted)
}

/// How many message ids a notification names at most: PostgreSQL refuses a
/// payload of 8,000 bytes or more, and an id takes up to 20 with its comma.
pub const NAMED_IN_A_NOTIFICATION: i64 = 300;

/// Extends the lease of messages by `lease_secs` from now; returns the ids
/// that still exist (a missing id was withdrawn, for example by cancellation).
pub async fn extend_lease(
    executor: impl PgExecutor<'_>,
    queue: &QueueName,
    msg_ids: &[i64],
    lease_secs: i32,
) -> Result<Vec<i64>, sqlx::Error> {
    let sql = format!(
        "update {} set vt = clock_timestamp() + make_interval(secs => $2)
          where msg_id = any($1) returning msg_id",
        queue.table()
    );
    sqlx::query_scalar(&sql)
        .bind(msg_ids)
        .bind(lease_secs)
        .fetch_all(executor)
        .await
}

/// Depth and age of one queue, as operators and autoscalers see it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QueueStats {
    pub queue_name: String,
    /// Messages waiting to be read (visible now).
    pub depth: i64,
    /// Messages read and leased but not yet deleted.
    pub in_flight: i64,
    /// Age in seconds of the oldest message, visible or not; 0 when empty.
    pub oldest_age_secs: f64,
}

/// The one queue-depth query, shared by the API, metrics and the documented
/// KEDA trigger: one scan of each Weft queue table.
pub async fn stats(executor: impl PgExecutor<'_>) -> Result<Vec<QueueStats>, sqlx::Error> {
    sqlx::query_as("select queue_name, depth, in_flight, oldest_age_secs from weft.queue_stats()")
        .fetch_all(executor)
        .await
}
