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

/// Step messages go through `weft.send_steps`, generated with one static
/// insert per namespace: registering a namespace adds its branch; a
/// namespace the body does not name yet (registered by a transaction that
/// committed after this session compiled it) still gets its messages, by
/// the dynamic insert; and two registrations at once both end up named.
#[tokio::test]
async fn step_messages_reach_every_namespace_queue_through_the_generated_sender() {
    let url = support::fresh_database().await;
    let pool = support::pool(&url, 4).await;
    let body = || async {
        sqlx::query_scalar::<_, String>(
            "select prosrc from pg_proc where oid = 'weft.send_steps(text, jsonb[])'::regprocedure",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let send = |ns: &'static str| {
        let pool = pool.clone();
        async move {
            let sent: Vec<(i64, serde_json::Value)> = sqlx::query_as(
                "select msg_id, message from weft.send_steps($1, array[$2::jsonb, $3::jsonb])",
            )
            .bind(ns)
            .bind(serde_json::json!({"n": 1}))
            .bind(serde_json::json!({"n": 2}))
            .fetch_all(&pool)
            .await
            .unwrap();
            let queued: Vec<(i64, serde_json::Value)> = sqlx::query_as(&format!(
                "select msg_id, message from pgmq.q_weft_steps_{ns} order by msg_id"
            ))
            .fetch_all(&pool)
            .await
            .unwrap();
            assert_eq!(sent, queued, "{ns}: returned what its queue holds");
            let order: Vec<_> = sent.iter().map(|(_, m)| m["n"].clone()).collect();
            assert_eq!(order, vec![serde_json::json!(1), serde_json::json!(2)]);
        }
    };

    sqlx::query("select weft.ensure_namespace('alpha')")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        body().await.contains("pgmq.q_weft_steps_alpha"),
        "alpha has its static insert"
    );
    send("alpha").await;

    // Registered behind the generator's back: no branch, same result.
    sqlx::raw_sql(
        "insert into weft.namespaces (name) values ('beta');
         select pgmq.create('weft_steps_beta');",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(!body().await.contains("q_weft_steps_beta"));
    send("beta").await;

    // Two registrations in concurrent transactions: the second waits for
    // the first's generator and then names both.
    let mut first = pool.begin().await.unwrap();
    sqlx::query("select weft.ensure_namespace('gamma')")
        .execute(&mut *first)
        .await
        .unwrap();
    let second = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("select weft.ensure_namespace('delta')")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    });
    // The second is inside ensure_namespace, waiting for the generator's lock.
    let waiting = support::wait_until(std::time::Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from pg_locks l
                             join pg_database d on d.oid = l.database
                            where d.datname = current_database()
                              and l.locktype = 'advisory' and not l.granted)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    })
    .await;
    assert!(
        waiting,
        "the second registration waits for the generator's lock"
    );
    first.commit().await.unwrap();
    second.await.unwrap();
    let last = body().await;
    for ns in ["alpha", "beta", "gamma", "delta"] {
        assert!(
            last.contains(&format!("q_weft_steps_{ns}")),
            "{ns} named in:\n{last}"
        );
    }
    send("gamma").await;
    send("delta").await;
}
