use std::{
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context;
use sqlx::{
    Connection, PgConnection, PgPool, Postgres,
    migrate::MigrateDatabase,
    pool::PoolConnection,
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
/// `CHECK_IDLE_AFTER` (the kind a database restart or a firewall may have cut) is pinged now; a busy one was
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
    let pool = pool_options(config)
        .connect_with(connect_options(config)?)
        .await
        .context("cannot connect to PostgreSQL (check DATABASE_URL)")?;
    match ConnectionBudget::read(&pool).await {
        Ok(budget) => budget.report(config.database_max_connections),
        Err(err) => tracing::debug!(error = %err, "cannot read the server's connection limits"),
    }
    Ok(pool)
}

/// The server's connection limit and use, as one process sees it at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// `max_connections`.
    pub max: i64,
    /// `superuser_reserved_connections` (and `reserved_connections` on PostgreSQL 16+): slots ordinary roles
    /// cannot use.
    pub reserved: i64,
    /// Client connections open now, this process's first one included.
    pub in_use: i64,
}

impl ConnectionBudget {
    /// Reads the limits and the connections open now.
    pub async fn read(pool: &PgPool) -> sqlx::Result<Self> {
        let (max, reserved, in_use) = sqlx::query_as::<_, (i64, i64, i64)>(
            "select current_setting('max_connections')::bigint,
                    current_setting('superuser_reserved_connections')::bigint
                      + coalesce(current_setting('reserved_connections', true)::bigint, 0),
                    (select count(*) from pg_stat_activity where backend_type = 'client backend')",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            max,
            reserved,
            in_use,
        })
    }

    /// Connections still free for ordinary roles.
    pub fn free(&self) -> i64 {
        self.max - self.reserved - self.in_use
    }

    /// Whether a pool of `pool_size` more connections (beyond the one already open) fits in what is free.
    pub fn fits(&self, pool_size: u32) -> bool {
        i64::from(pool_size) - 1 <= self.free()
    }

    /// Logs the budget; warns when this process's pool could not open all its connections. Every api replica and
    /// every worker opens up to `DATABASE_MAX_CONNECTIONS`, so the sum over all processes must stay below
    /// `max_connections - superuser_reserved_connections` (see the README's "Running in production").
    pub fn report(&self, pool_size: u32) {
        if self.fits(pool_size) {
            tracing::info!(
                max_connections = self.max,
                reserved = self.reserved,
                in_use = self.in_use,
                pool = pool_size,
                "PostgreSQL connection budget"
            );
        } else {
            tracing::warn!(
                max_connections = self.max,
                reserved = self.reserved,
                in_use = self.in_use,
                pool = pool_size,
                "PostgreSQL has fewer free connections than this process's pool may open: requests will wait and \
                 answer 503 under load (lower DATABASE_MAX_CONNECTIONS, run fewer processes, raise max_connections \
                 or put PgBouncer in front)"
            );
        }
    }
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

/// How long a kept connection may sit idle before it goes back to the pool.
const KEEP_IDLE_FOR: Duration = Duration::from_secs(1);
/// How long a connection is kept at most, however busy: then it goes back to the pool, which checks it and
/// applies its own rules (its maximum lifetime), and the next statement takes one afresh.
const KEEP_AT_MOST: Duration = Duration::from_secs(60);

/// Pool connections kept checked out between statements while they are busy, for a batcher whose statements
/// follow each other without pause.
///
/// sqlx returns a connection to its pool through a spawned task that first pings it: a round trip per
/// statement, with no setting to turn it off. On the list path, with PostgreSQL on the same two cores, that
/// ping cost about 7 % of the requests served. A kept connection skips both; one idle for `KEEP_IDLE_FOR`, or
/// kept for `KEEP_AT_MOST`, goes back to the pool (pinged then, as usual), so a quiet batcher holds nothing. A
/// statement that fails drops its connection (the `Kept` is not given back), and the pool checks it as it
/// would any other.
#[derive(Debug, Clone)]
pub struct KeptConnections {
    pool: PgPool,
    idle: Arc<Mutex<Vec<(Kept, Instant)>>>,
}

/// A connection out of the pool for a [`KeptConnections`]; dropped, it goes back to the pool.
#[derive(Debug)]
pub struct Kept {
    conn: PoolConnection<Postgres>,
    /// When it was taken from the pool.
    since: Instant,
}

impl std::ops::Deref for Kept {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Kept {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl KeptConnections {
    /// Keeps connections of `pool`; must be called on a Tokio runtime (it starts the task that returns idle
    /// ones).
    pub fn new(pool: PgPool) -> Self {
        let kept = Self {
            pool,
            idle: Arc::default(),
        };
        let idle = Arc::downgrade(&kept.idle);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(KEEP_IDLE_FOR);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(idle) = idle.upgrade() else { return };
                let expired: Vec<_> = {
                    let mut idle = lock(&idle);
                    let (expired, fresh) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|(_, idle_since)| idle_since.elapsed() >= KEEP_IDLE_FOR);
                    *idle = fresh;
                    expired
                };
                // Dropped outside the lock: each goes back to the pool.
                drop(expired);
            }
        });
        kept
    }

    /// The most recently used idle connection, or one from the pool.
    pub async fn take(&self) -> sqlx::Result<Kept> {
        let kept = self.lock().pop();
        match kept {
            Some((kept, _)) => Ok(kept),
            None => Ok(Kept {
                conn: self.pool.acquire().await?,
                since: Instant::now(),
            }),
        }
    }

    /// Keeps `kept` for the next statement (after one that succeeded on it), unless it has been kept for
    /// `KEEP_AT_MOST`: then it goes back to the pool.
    pub fn give_back(&self, kept: Kept) {
        if kept.since.elapsed() < KEEP_AT_MOST {
            self.lock().push((kept, Instant::now()));
        }
    }

    /// How many connections sit idle here now.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Kept, Instant)>> {
        lock(&self.idle)
    }
}

/// The idle kept connections, whatever a panicking holder of the lock left (a list of connections stays valid).
fn lock(idle: &Mutex<Vec<(Kept, Instant)>>) -> MutexGuard<'_, Vec<(Kept, Instant)>> {
    idle.lock().unwrap_or_else(PoisonError::into_inner)
}
