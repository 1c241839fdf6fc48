//! Test support: a fresh database per test, cloned from a migrated template.

use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// The server every test uses.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a PostgreSQL server; scripts/test starts one")
}

fn options(database: &str) -> PgConnectOptions {
    let options: PgConnectOptions = server_url()
        .parse()
        .expect("DATABASE_URL is not a valid URL");
    options.database(database).disable_statement_logging()
}

/// A name that changes whenever the migrations change, so a stale template
/// database from an earlier build is never used.
fn template_name() -> String {
    let mut fingerprint: u64 = 0xcbf2_9ce4_8422_2325;
    for migration in shared::migrate::MIGRATOR.iter() {
        for byte in migration
            .version
            .to_le_bytes()
            .iter()
            .chain(migration.checksum.iter())
        {
            fingerprint = (fingerprint ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("weft_tpl_{fingerprint:016x}")
}

/// Creates a fresh, migrated database for one test and returns its URL.
pub async fn fresh_database() -> String {
    let template = template_name();
    let mut admin = PgConnection::connect_with(&options("postgres"))
        .await
        .expect("connect to the test server");
    // Serialize template creation across test processes (nextest runs each
    // test in its own process).
    sqlx::query("select pg_advisory_lock(727274)")
        .execute(&mut admin)
        .await
        .expect("lock");
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&template)
            .fetch_one(&mut admin)
            .await
            .expect("query pg_database");
    if !exists {
        let building = format!("{template}_building");
        sqlx::query(&format!("drop database if exists {building}"))
            .execute(&mut admin)
            .await
            .expect("drop");
        sqlx::query(&format!("create database {building}"))
            .execute(&mut admin)
            .await
            .expect("create");
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options(&building))
            .await
            .expect("connect");
        shared::migrate::run(&pool)
            .await
            .expect("migrate the template database");
        pool.close().await;
        sqlx::query(&format!("alter database {building} rename to {template}"))
            .execute(&mut admin)
            .await
            .expect("rename");
    }
    let name = format!("weft_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("create database {name} template {template}"))
        .execute(&mut admin)
        .await
        .expect("clone the template database");
    sqlx::query("select pg_advisory_unlock(727274)")
        .execute(&mut admin)
        .await
        .expect("unlock");
    fresh_url_for(&name)
}

/// The URL of another database on the test server.
pub fn fresh_url_for(database: &str) -> String {
    let mut url: url_lite::Url = server_url().parse().expect("url");
    url.set_database(database);
    url.to_string()
}

/// A pool on a fresh, migrated database.
pub async fn fresh_pool() -> PgPool {
    let url = fresh_database().await;
    pool(&url, 20).await
}

pub async fn pool(url: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .expect("connect to the test database")
}

/// Polls `condition` until it holds or `deadline` passes; returns whether it held.
pub async fn wait_until<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Just enough URL handling to swap the database name.
mod url_lite {
    use std::fmt;
    use std::str::FromStr;

    pub struct Url {
        base: String,
        query: String,
    }

    impl Url {
        pub fn set_database(&mut self, name: &str) {
            let authority_end = self.base.find("://").map_or(0, |i| i + 3);
            if let Some(slash) = self.base[authority_end..].find('/') {
                self.base.truncate(authority_end + slash);
            }
            self.base.push('/');
            self.base.push_str(name);
        }
    }

    impl FromStr for Url {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            let (base, query) = match s.split_once('?') {
                Some((b, q)) => (b.to_owned(), format!("?{q}")),
                None => (s.to_owned(), String::new()),
            };
            Ok(Url { base, query })
        }
    }

    impl fmt::Display for Url {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}{}", self.base, self.query)
        }
    }
}

/// A private PostgreSQL cluster of its own, for tests that stop or restart
/// the server (which would disturb every other test on the shared one).
/// Stopped and deleted when dropped.
pub struct Cluster {
    port: u16,
    dir: String,
    pub url: String,
}

impl Cluster {
    fn pg(&self, args: &[&str]) -> String {
        let output = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg"))
            .args(args)
            .env("WEFT_PG_PORT", self.port.to_string())
            .env("WEFT_PG_DIR", &self.dir)
            .env("WEFT_PG_FAST", "1")
            .output()
            .expect("run scripts/pg");
        assert!(
            output.status.success(),
            "scripts/pg {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts a new cluster and migrates its `weft` database.
    pub async fn start() -> Cluster {
        let port = crate::fleet::free_port();
        let mut cluster = Cluster {
            port,
            dir: format!("/tmp/weft-pg-it-{port}"),
            url: String::new(),
        };
        let out = cluster.pg(&["start"]);
        cluster.url = out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("DATABASE_URL="))
            .expect("url")
            .to_owned();
        let pool = pool(&cluster.url, 3).await;
        shared::migrate::run(&pool)
            .await
            .expect("migrate the private cluster");
        pool.close().await;
        cluster
    }

    /// `scripts/pg stop` (fast shutdown).
    pub fn stop(&self) {
        self.pg(&["stop"]);
    }

    /// Starts it again after [`Cluster::stop`].
    pub fn start_again(&self) {
        self.pg(&["start"]);
    }

    /// `scripts/pg restart fast|immediate`.
    pub fn restart(&self, mode: &str) {
        self.pg(&["restart", mode]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg"))
            .args(["stop", "--purge"])
            .env("WEFT_PG_PORT", self.port.to_string())
            .env("WEFT_PG_DIR", &self.dir)
            .output();
    }
}
