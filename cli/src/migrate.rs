//! `pinq migrate`: creates the database named in `DATABASE_URL` if it is missing and
//! applies the embedded migrations. `pinq up` runs the same steps before it starts
//! anything.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use pinq_core::db::{self, MIGRATOR};
use sqlx::PgPool;
use sqlx::migrate::Migrate;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// What a migration run did, printed as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub database: String,
    /// Migrations this run applied.
    pub applied_now: usize,
    /// Migrations recorded in the database after the run.
    pub applied_total: usize,
}

impl fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        if self.applied_now == 0 {
            write!(
                f,
                "migrated {}: already up to date ({} migration{} applied earlier)",
                self.database,
                self.applied_total,
                plural(self.applied_total)
            )
        } else {
            write!(
                f,
                "migrated {}: {} migration{} applied ({} in total)",
                self.database,
                self.applied_now,
                plural(self.applied_now),
                self.applied_total
            )
        }
    }
}

/// Creates the database if needed, connects, and migrates it.
pub async fn run(database_url: &str) -> anyhow::Result<MigrateReport> {
    let pool = prepare(database_url).await?;
    let report = migrate(&pool).await;
    pool.close().await;
    report
}

/// Creates the database if needed and returns a small pool to it.
pub async fn prepare(database_url: &str) -> anyhow::Result<PgPool> {
    db::ensure_database(database_url)
        .await
        .context("failed to create the database (is PostgreSQL running and DATABASE_URL right?)")?;
    let options: PgConnectOptions = database_url.parse().context("invalid DATABASE_URL")?;
    // Migrations make PostgreSQL chatter ("relation … already exists, skipping"), which
    // sqlx would log as info; only warnings are worth showing.
    let options = options.options([("client_min_messages", "warning")]);
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .context("failed to connect to the database")
}

/// Applies pending migrations and counts what it did.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<MigrateReport> {
    let database: (String,) = sqlx::query_as("SELECT current_database()")
        .fetch_one(pool)
        .await
        .context("failed to query the database name")?;
    let before = applied_count(pool).await?;
    MIGRATOR
        .run(pool)
        .await
        .context("failed to apply migrations")?;
    let after = applied_count(pool).await?;
    Ok(MigrateReport {
        database: database.0,
        applied_now: after.saturating_sub(before),
        applied_total: after,
    })
}

/// Migrations recorded as applied. Creates sqlx's bookkeeping table if it is missing,
/// which `Migrator::run` would do first thing anyway.
async fn applied_count(pool: &PgPool) -> anyhow::Result<usize> {
    let mut conn = pool
        .acquire()
        .await
        .context("failed to connect to the database")?;
    conn.ensure_migrations_table(&MIGRATOR.table_name)
        .await
        .context("failed to create the migrations table")?;
    let applied = conn
        .list_applied_migrations(&MIGRATOR.table_name)
        .await
        .context("failed to list applied migrations")?;
    Ok(applied.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_honest_about_what_ran() {
        let fresh = MigrateReport {
            database: "pinq".into(),
            applied_now: 1,
            applied_total: 1,
        };
        assert_eq!(
            fresh.to_string(),
            "migrated pinq: 1 migration applied (1 in total)"
        );
        let again = MigrateReport {
            applied_now: 0,
            ..fresh
        };
        assert_eq!(
            again.to_string(),
            "migrated pinq: already up to date (1 migration applied earlier)"
        );
    }
}
