use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    Connection, PgConnection, PgPool, Postgres,
    migrate::MigrateDatabase,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseConfig;

/// Connect options with a statement timeout, so that a stalled database turns into an error, not a hang, and
/// with generic plans for prepared statements.
///
/// Every statement of the service has a fixed shape meant for one index, so its generic plan is its best plan
/// (each was checked with `EXPLAIN` under `force_generic_plan`). Left to choose, PostgreSQL kept planning the
/// list query afresh on every run (its generic cost estimate looked higher), which doubled the database's work
/// per list request.
fn connect_options(config: &DatabaseConfig) -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(&config.database_url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    Ok(options.options([
        (
            "statement_timeout",
            config.database_statement_timeout_ms.to_string(),
        ),
        ("plan_cache_mode", "force_generic_plan".to_owned()),
    ]))
}

/// A pooled connection idle longer than this is checked with a round trip before it is handed out.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(5);

/// Pool settings: bounded size and a bounded wait for a connection.
///
/// sqlx's default `test_before_acquire` pings every connection on every checkout: one extra round trip per
/// statement, which under load cost as much as the statement itself. Only a connection idle longer than
/// [`CHECK_IDLE_AFTER`] (the kind a database restart or a firewall may have cut) is pinged now; a busy one was
/// proven alive by its last statement.
pub fn pool_options(config: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(config.acquire_timeout())
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > CHECK_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Creates the database named in the URL if it does not exist yet.
pub async fn ensure_database(config: &DatabaseConfig) -> anyhow::Result<()> {
    let url = &config.database_url;
    let exists = Postgres::database_exists(url)
        .await
        .context("cannot reach PostgreSQL (check DATABASE_URL and that the server is running)")?;
    if !exists {
        tracing::info!("database does not exist yet: creating it");
        if let Err(err) = Postgres::create_database(url).await {
            // Another process may have created it in the meantime.
            if !Postgres::database_exists(url).await.unwrap_or(false) {
                return Err(err).context("cannot create the database");
            }
        }
    }
    Ok(())
}

/// Connects; with `MIGRATE_ON_START` (the default), first creates the database if missing and applies pending
/// migrations.
pub async fn connect(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    if config.migrate_on_start {
        migrate(config).await?;
    }
    pool_options(config)
        .connect_with(connect_options(config)?)
        .await
        .context("cannot connect to PostgreSQL (check DATABASE_URL)")
}

/// Creates the database if missing and applies pending migrations, on a connection of its own without the
/// statement timeout: a migration may rightly run longer than any request, and so may the wait for sqlx's
/// migration lock while another process migrates (replicas starting together).
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<()> {
    ensure_database(config).await?;
    let options = PgConnectOptions::from_str(&config.database_url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .options([("statement_timeout", "0")]);
    let mut conn = PgConnection::connect_with(&options)
        .await
        .context("cannot connect to PostgreSQL (check DATABASE_URL)")?;
    crate::MIGRATOR
        .run(&mut conn)
        .await
        .context("cannot apply the database migrations")?;
    conn.close().await.ok();
    Ok(())
}

/// A pool that connects on first use; for tools and tests that must start while PostgreSQL is down.
pub fn connect_lazy(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    Ok(pool_options(config).connect_lazy_with(connect_options(config)?))
}
