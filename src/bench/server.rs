//! The PostgreSQL server the benchmark runs against: the private benchmark
//! cluster (started with default durability) or a given server, a migrated
//! template database, one fresh database per workload run, and the
//! description of the machine and the server that every report carries.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// A server with a migrated template database to clone workload databases from.
pub struct Server {
    /// A pool on a database that no workload uses (for CREATE DATABASE and
    /// for reading `pg_stat_database` without adding transactions to a
    /// workload's database).
    pub admin: PgPool,
    url: String,
    base: String,
    template: String,
    /// Whether `track_commit_timestamp` is on: then "committed" instants
    /// are the commit timestamps PostgreSQL records, else the clock inside
    /// the transaction just before it commits.
    pub commit_ts: bool,
    pub description: Value,
    /// `ALTER DATABASE … SET` for every workload database.
    settings: Vec<(String, String)>,
}

impl Server {
    /// Starts or reuses the private benchmark cluster on `port`, or uses
    /// `database_url`. Refuses a non-durable cluster unless allowed.
    pub async fn open(
        database_url: Option<&str>,
        port: u16,
        allow_nondurable: bool,
        settings: &[String],
    ) -> anyhow::Result<Server> {
        let settings = settings
            .iter()
            .map(|s| parse_setting(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (url, base, admin_db, owned) = match database_url {
            Some(url) => {
                let name = database_name(url).context("--database-url names no database")?;
                (url.to_owned(), name.clone(), name, false)
            }
            None => {
                eprintln!("bench: starting the private benchmark cluster on port {port}");
                let url = tokio::task::spawn_blocking(move || crate::pg::start(port)).await??;
                (url, "bench".to_owned(), "postgres".to_owned(), true)
            }
        };
        let mut admin = connect(&with_database(&url, &admin_db), 3).await?;
        let track: String = sqlx::query_scalar("show track_commit_timestamp")
            .fetch_one(&admin)
            .await?;
        if owned && track != "on" {
            // Commit timestamps make "result committed" exact; the setting
            // needs a restart, and stays in the cluster's auto.conf.
            eprintln!("bench: enabling track_commit_timestamp (restarts the benchmark cluster)");
            sqlx::query("alter system set track_commit_timestamp = on")
                .execute(&admin)
                .await?;
            admin.close().await;
            tokio::task::spawn_blocking(move || crate::pg::run(&["restart", "fast"], port))
                .await??;
            admin = connect(&with_database(&url, &admin_db), 3).await?;
        }
        let description = describe(&admin, owned, port).await?;
        let durable = description["postgres"]["fsync"] == "on"
            && description["postgres"]["synchronous_commit"] != "off";
        if !durable && !allow_nondurable {
            if owned {
                bail!(
                    "the benchmark cluster on port {port} does not commit durably (fsync or \
                     synchronous_commit off; was it started with WEFT_PG_FAST=1?). Stop it \
                     with `WEFT_PG_PORT={port} scripts/pg stop` and run again without \
                     WEFT_PG_FAST, or pass --allow-nondurable"
                );
            }
            eprintln!(
                "bench: WARNING: this server does not commit durably (fsync or synchronous_commit \
                 off); figures are not comparable with the documented ones"
            );
        }
        let commit_ts: String = sqlx::query_scalar("show track_commit_timestamp")
            .fetch_one(&admin)
            .await?;
        let template = format!("{base}_tpl");
        let server = Server {
            admin,
            url,
            base,
            template,
            commit_ts: commit_ts == "on",
            description,
            settings,
        };
        server.build_template().await?;
        Ok(server)
    }

    async fn build_template(&self) -> anyhow::Result<()> {
        self.drop_database(&self.template).await?;
        sqlx::query(&format!("create database {}", self.template))
            .execute(&self.admin)
            .await
            .context("creating the template database")?;
        let pool = connect(&with_database(&self.url, &self.template), 2).await?;
        shared::migrate::run(&pool)
            .await
            .context("migrating the template database")?;
        pool.close().await;
        Ok(())
    }

    /// A fresh, migrated database named `<base>_<suffix>`; returns its name and URL.
    pub async fn fresh(&self, suffix: &str) -> anyhow::Result<(String, String)> {
        let name = format!("{}_{suffix}", self.base);
        self.drop_database(&name).await?;
        sqlx::query(&format!(
            "create database {name} template {}",
            self.template
        ))
        .execute(&self.admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
        for (key, value) in &self.settings {
            sqlx::query(&format!(
                "alter database {name} set {key} = '{}'",
                value.replace('\'', "''")
            ))
            .execute(&self.admin)
            .await
            .with_context(|| format!("setting {key} on {name}"))?;
        }
        Ok((name.clone(), with_database(&self.url, &name)))
    }

    pub async fn drop_database(&self, name: &str) -> anyhow::Result<()> {
        sqlx::query(&format!("drop database if exists {name} with (force)"))
            .execute(&self.admin)
            .await
            .with_context(|| format!("dropping database {name}"))?;
        Ok(())
    }

    pub async fn close(self, keep: bool) {
        if !keep {
            let _ = self.drop_database(&self.template).await;
        }
        self.admin.close().await;
    }

    /// Median ms of 50 durable commits: each transaction takes a
    /// transaction id, so its commit record is flushed before it returns.
    pub async fn commit_probe(&self) -> anyhow::Result<f64> {
        let mut conn = self.admin.acquire().await?;
        let mut ms = Vec::with_capacity(50);
        for _ in 0..50 {
            let start = std::time::Instant::now();
            sqlx::query("select pg_current_xact_id()")
                .execute(&mut *conn)
                .await?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        super::stats::median(&ms).context("no probe")
    }

    /// Committed plus rolled-back transactions of a database so far.
    pub async fn transactions(&self, database: &str) -> anyhow::Result<i64> {
        // A fresh snapshot: this session would otherwise reuse cached stats.
        sqlx::query("select pg_stat_clear_snapshot()")
            .execute(&self.admin)
            .await?;
        Ok(sqlx::query_scalar(
            "select (xact_commit + xact_rollback)::bigint from pg_stat_database where datname = $1",
        )
        .bind(database)
        .fetch_one(&self.admin)
        .await?)
    }
}

/// A pool for the benchmark's own queries (which log nothing, not even
/// slow statements: DROP DATABASE is slow and expected to be). Without JIT,
/// as Weft's own: a progress query compiling for a second would take the
/// CPU from what is being measured.
pub async fn connect(url: &str, max: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("invalid database URL {}", redact(url)))?;
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(
            options
                .disable_statement_logging()
                .options([("jit", "off")]),
        )
        .await
        .with_context(|| format!("connecting to {}", redact(url)))
}

/// `NAME=VALUE`, with a name fit to splice into SQL.
fn parse_setting(text: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = text
        .split_once('=')
        .with_context(|| format!("--db-setting {text:?}: expected NAME=VALUE"))?;
    let key = key.trim();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        bail!("--db-setting {text:?}: not a setting name");
    }
    Ok((key.to_owned(), value.trim().to_owned()))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn split_query(url: &str) -> (&str, &str) {
    match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    }
}

/// The database a `postgres://` URL names.
pub fn database_name(url: &str) -> Option<String> {
    let (base, _) = split_query(url);
    let authority = base.find("://").map_or(0, |i| i + 3);
    let slash = base[authority..].find('/')? + authority;
    let name = &base[slash + 1..];
    (!name.is_empty()).then(|| name.to_owned())
}

/// The same URL naming another database.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = split_query(url);
    let authority = base.find("://").map_or(0, |i| i + 3);
    let prefix = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    format!("{prefix}/{name}{query}")
}

/// The URL with an `application_name`, so each process shows in `pg_stat_activity`.
pub fn with_application_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The 1-minute load average now.
pub fn load_average() -> Option<f64> {
    read("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
}

async fn describe(admin: &PgPool, owned: bool, port: u16) -> anyhow::Result<Value> {
    let cpuinfo = read("/proc/cpuinfo");
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let mut settings = serde_json::Map::new();
    for name in [
        "server_version",
        "synchronous_commit",
        "fsync",
        "full_page_writes",
        "wal_sync_method",
        "shared_buffers",
        "max_connections",
        "track_commit_timestamp",
    ] {
        let value: String = sqlx::query_scalar(&format!("show {name}"))
            .fetch_one(admin)
            .await?;
        settings.insert(name.to_owned(), Value::String(value));
    }
    settings.insert(
        "server".to_owned(),
        Value::String(if owned {
            format!("private benchmark cluster (scripts/pg, port {port})")
        } else {
            "given by --database-url".to_owned()
        }),
    );
    Ok(json!({
        "cores": cores,
        "cpu_model": model,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "postgres": settings,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = "postgres://u:pw@127.0.0.1:5432/weft?sslmode=disable";
        assert_eq!(database_name(url).as_deref(), Some("weft"));
        assert_eq!(
            with_database(url, "bench_w1"),
            "postgres://u:pw@127.0.0.1:5432/bench_w1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:1", "x"),
            "postgres://h:1/x".to_owned()
        );
        assert_eq!(
            with_application_name("postgres://h/x", "a"),
            "postgres://h/x?application_name=a"
        );
        assert_eq!(
            with_application_name(url, "a"),
            format!("{url}&application_name=a")
        );
        assert_eq!(
            redact(url),
            "postgres://u:***@127.0.0.1:5432/weft?sslmode=disable"
        );
        assert_eq!(database_name("postgres://h:1/"), None);
    }
}
