//! The one migrator: installs pgmq from the SQL the `pgmq` crate embeds, then
//! applies Weft's migrations in `migrations/`. Used by `weft migrate`, by
//! server startup and by tests alike.

use sqlx::PgPool;
use sqlx::migrate::Migrator;

/// Weft's own migrations, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The pgmq version the embedded SQL installs; part of our schema contract.
pub const PGMQ_VERSION: &str = "1.11.1";

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("installing pgmq failed: {0}")]
    Pgmq(String),
    #[error("pgmq {found} is installed, but this build needs {PGMQ_VERSION}")]
    PgmqVersion { found: String },
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Brings the database to this build's schema. Safe to run concurrently from
/// several processes (both steps take locks) and a no-op when up to date.
pub async fn run(pool: &PgPool) -> Result<(), MigrateError> {
    pgmq::install::install_sql_from_embedded(pool)
        .await
        .map_err(|e| MigrateError::Pgmq(e.to_string()))?;
    let found: Option<String> =
        sqlx::query_scalar("select max(version) from pgmq.__pgmq_migrations")
            .fetch_one(pool)
            .await?;
    match found {
        Some(v) if v == PGMQ_VERSION => {}
        other => {
            return Err(MigrateError::PgmqVersion {
                found: other.unwrap_or_default(),
            });
        }
    }
    MIGRATOR.run(pool).await?;
    Ok(())
}
