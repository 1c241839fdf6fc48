//! The one migrator: applies to an empty database, and a second run does nothing.

use crate::support;

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_are_idempotent() {
    let admin = support::pool(&support::server_url(), 2).await;
    let name = format!("weft_empty_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("create database {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = support::fresh_url_for(&name);
    let pool = support::pool(&url, 4).await;
    shared::migrate::run(&pool)
        .await
        .expect("first run migrates");
    let count = |pool: sqlx::PgPool| async move {
        let ours: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .unwrap();
        let pgmq: i64 = sqlx::query_scalar("select count(*) from pgmq.__pgmq_migrations")
            .fetch_one(&pool)
            .await
            .unwrap();
        (ours, pgmq)
    };
    let first = count(pool.clone()).await;
    assert_eq!(first.0 as usize, shared::migrate::MIGRATOR.iter().count());
    shared::migrate::run(&pool)
        .await
        .expect("second run succeeds");
    assert_eq!(
        count(pool.clone()).await,
        first,
        "the second run applied nothing"
    );
    let queues: Vec<String> =
        sqlx::query_scalar("select queue_name from pgmq.list_queues() order by 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        queues,
        vec!["weft_results".to_owned(), "weft_results_dlq".to_owned()]
    );
    // Concurrent migrators (several processes starting at once) do not trip over each other.
    pool.close().await;
    let other = format!("weft_empty_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("create database {other}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = support::fresh_url_for(&other);
    let (a, b, c) = tokio::join!(
        async { shared::migrate::run(&support::pool(&url, 3).await).await },
        async { shared::migrate::run(&support::pool(&url, 3).await).await },
        async { shared::migrate::run(&support::pool(&url, 3).await).await },
    );
    a.expect("migrator a");
    b.expect("migrator b");
    c.expect("migrator c");
}

/// No engine function may JIT-compile: a cost estimate past
/// `jit_above_cost` after an ANALYZE made every execution compile for
/// seconds (the stalls of `migrations/…_no_jit.sql`). Every PL/pgSQL
/// function of the schema carries `jit=off`, so a function added later
/// without it fails here; and Weft's own connections turn JIT off.
#[tokio::test]
async fn the_engine_never_jit_compiles() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 2).await;
    let (plpgsql, without): (i64, Vec<String>) = sqlx::query_as(
        "select count(*),
                coalesce(array_agg(p.oid::regprocedure::text)
                         filter (where not coalesce('jit=off' = any (p.proconfig), false)), '{}')
           from pg_proc p
           join pg_namespace n on n.oid = p.pronamespace
           join pg_language l on l.oid = p.prolang
          where n.nspname = 'weft' and l.lanname = 'plpgsql'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        plpgsql >= 10,
        "the engine's functions are PL/pgSQL: {plpgsql}"
    );
    assert!(without.is_empty(), "without jit=off: {without:?}");

    let weft_pool = weft::cli::connect_url(&url, 2).await.unwrap();
    let jit: String = sqlx::query_scalar("show jit")
        .fetch_one(&weft_pool)
        .await
        .unwrap();
    assert_eq!(jit, "off");
}
