//! W0: the bare SQL round trip of one step through pgmq, with no Weft code.
//! Per step: send the step message; read it; in one transaction send a
//! result and delete the step message; read the result; in one transaction
//! update the step's row, insert a transition and delete the result.
//! L = median ms per step with one client; U = steps/s with four clients.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use sqlx::PgConnection;

use super::Measured;
use super::server::connect;

const SETUP: &str = "
create table bench_steps (id bigint primary key, state text not null);
create table bench_transitions (
    id bigint generated always as identity primary key,
    step_id bigint not null,
    to_state text not null,
    at timestamptz not null default clock_timestamp()
);
select pgmq.create('bench_w0_steps');
select pgmq.create('bench_w0_results');
";

const WARMUP: usize = 20;
/// Probes of a bare statement and of a one-row durable commit.
const COMMITS: usize = 100;

/// Runs W0 on a fresh database: `sequential` steps with one client, then
/// `per_client` steps on each of `clients` clients at once.
pub async fn run(
    url: &str,
    sequential: usize,
    clients: usize,
    per_client: usize,
) -> anyhow::Result<Measured> {
    let pool = connect(url, clients as u32 + 1).await?;
    sqlx::raw_sql(SETUP).execute(&pool).await?;
    let total = WARMUP + 2 * sequential + clients * per_client;
    sqlx::query("insert into bench_steps select g, 'pending' from generate_series(1, $1) g")
        .bind(total as i64)
        .execute(&pool)
        .await?;

    let mut out = Measured::default();
    // (a) one client, one step after another.
    let mut conn = pool.acquire().await?;
    // A few warm-up steps (not measured) prepare the statements.
    for id in 1..=WARMUP as i64 {
        round_trip(&mut conn, id, Reads::Durable).await?;
    }
    for id in WARMUP as i64 + 1..=(WARMUP + sequential) as i64 {
        let start = Instant::now();
        round_trip(&mut conn, id, Reads::Durable).await?;
        out.sample("step", start.elapsed().as_secs_f64() * 1e3);
    }
    // What-if, not part of L: the same, with each pgmq.read committed
    // without waiting for its WAL flush (a lost read only makes a message
    // visible again early, which at-least-once delivery allows).
    let from = (WARMUP + sequential) as i64 + 1;
    for id in from..from + sequential as i64 {
        let start = Instant::now();
        round_trip(&mut conn, id, Reads::NoFlushWait).await?;
        out.sample(
            "step_reads_no_flush_wait",
            start.elapsed().as_secs_f64() * 1e3,
        );
    }
    // What one statement and one durable commit cost here: a step is five
    // durable commits (pgmq.read updates the message, so it writes too).
    for _ in 0..COMMITS {
        let start = Instant::now();
        sqlx::query("select 1").execute(&mut *conn).await?;
        out.sample("select", start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        sqlx::query("insert into bench_transitions (step_id, to_state) values (0, 'probe')")
            .execute(&mut *conn)
            .await?;
        out.sample("commit", start.elapsed().as_secs_f64() * 1e3);
    }
    drop(conn);

    // (b) `clients` clients at once, on the same two queues.
    let first = (WARMUP + 2 * sequential) as i64 + 1;
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..clients {
        let pool = pool.clone();
        let from = first + (c * per_client) as i64;
        handles.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            for id in from..from + per_client as i64 {
                round_trip(&mut conn, id, Reads::Durable).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await.context("a W0 client panicked")??;
    }
    let secs = start.elapsed().as_secs_f64();
    out.figures.insert(
        "parallel_steps_per_s".into(),
        (clients * per_client) as f64 / secs,
    );
    let complete: i64 =
        sqlx::query_scalar("select count(*) from bench_steps where state = 'complete'")
            .fetch_one(&pool)
            .await?;
    out.check(
        "every_step_completed_once",
        complete == total as i64,
        json!({"complete": complete, "steps": total}),
    );
    out.info.insert(
        "shape".into(),
        json!({"sequential_steps": sequential, "clients": clients, "steps_per_client": per_client}),
    );
    pool.close().await;
    Ok(out)
}

/// How a round trip's pgmq.read commits.
#[derive(Debug, Clone, Copy)]
enum Reads {
    Durable,
    NoFlushWait,
}

/// One step's round trip. With several clients a read may take another
/// client's message; every client sends before it reads, so it finds one.
async fn round_trip(conn: &mut PgConnection, id: i64, reads: Reads) -> anyhow::Result<()> {
    let _: i64 = sqlx::query_scalar("select * from pgmq.send('bench_w0_steps', $1)")
        .bind(json!({ "step_id": id }))
        .fetch_one(&mut *conn)
        .await?;
    let (step_msg, step_id) = read_one(conn, "bench_w0_steps", reads).await?;

    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let _: i64 = sqlx::query_scalar("select * from pgmq.send('bench_w0_results', $1)")
        .bind(json!({ "step_id": step_id, "status": "success" }))
        .fetch_one(&mut *tx)
        .await?;
    let _: bool = sqlx::query_scalar("select pgmq.delete('bench_w0_steps', $1::bigint)")
        .bind(step_msg)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;

    let (result_msg, result_step) = read_one(conn, "bench_w0_results", reads).await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("update bench_steps set state = 'complete' where id = $1")
        .bind(result_step)
        .execute(&mut *tx)
        .await?;
    sqlx::query("insert into bench_transitions (step_id, to_state) values ($1, 'complete')")
        .bind(result_step)
        .execute(&mut *tx)
        .await?;
    let _: bool = sqlx::query_scalar("select pgmq.delete('bench_w0_results', $1::bigint)")
        .bind(result_msg)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Reads one message (retrying while another client holds them all);
/// returns its id and the step id it carries.
async fn read_one(
    conn: &mut PgConnection,
    queue: &str,
    reads: Reads,
) -> anyhow::Result<(i64, i64)> {
    let sql = match reads {
        Reads::Durable => "select msg_id, message from pgmq.read($1, 30, 1)",
        // set_config(…, true) lasts until the end of the statement's own
        // transaction, whose commit then does not wait for the flush.
        Reads::NoFlushWait => {
            "select m.msg_id, m.message
             from (select set_config('synchronous_commit', 'off', true)) c,
                  pgmq.read($1, 30, 1) m"
        }
    };
    for _ in 0..10_000 {
        let row: Option<(i64, serde_json::Value)> = sqlx::query_as(sql)
            .bind(queue)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some((msg_id, message)) = row {
            let step = message["step_id"]
                .as_i64()
                .context("message without step_id")?;
            return Ok((msg_id, step));
        }
        tokio::task::yield_now().await;
    }
    anyhow::bail!("no message on {queue} after 10,000 reads")
}
