//! Configuration parts shared by both binaries. Each is a `clap::Args` group read from flags or the
//! environment, so `api --help` and `worker --help` document every variable.

use std::time::Duration;

use clap::{Args, ValueEnum};

/// Where PostgreSQL is and how long to wait for it. Its `Debug` hides the password in the URL.
#[derive(Clone, Args)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. The database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@localhost:5432/orders",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Most connections the pool opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,

    /// How long a request waits for a free connection before answering 503 (milliseconds).
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    pub database_acquire_timeout_ms: u64,

    /// Longest a single SQL statement may run (milliseconds); a stalled database becomes a 503, not a hang.
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT_MS", default_value_t = 3000)]
    pub database_statement_timeout_ms: u64,

    /// Apply pending migrations at start (on a connection without the statement timeout). Set it to false for a
    /// rolling deploy that runs `api migrate` first.
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
}

impl DatabaseConfig {
    /// The pool acquire timeout.
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.database_acquire_timeout_ms)
    }

    /// The statement timeout.
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.database_statement_timeout_ms)
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("database_url", &redacted_url(&self.database_url))
            .field("database_max_connections", &self.database_max_connections)
            .field(
                "database_acquire_timeout_ms",
                &self.database_acquire_timeout_ms,
            )
            .field(
                "database_statement_timeout_ms",
                &self.database_statement_timeout_ms,
            )
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

/// Where the Redis queue is. Its `Debug` hides the password in the URL.
#[derive(Clone, Args)]
pub struct QueueConfig {
    /// Redis URL of the job queue.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://localhost:6379/0",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Name of the queue (the prefix of its Redis keys). The api and the workers must agree on it.
    #[arg(long, env = "QUEUE_NAME", default_value = crate::queue::DEFAULT_QUEUE_NAME)]
    pub queue_name: String,

    /// How long one Redis command may take before it counts as failed (milliseconds).
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,

    /// Most jobs waiting in Redis. Past it, new orders wait in PostgreSQL (the queue of record) and the
    /// reconciler feeds them in, oldest first, as the queue drains. At most 5000: apalis-redis fails for good
    /// when about 8,000 jobs are due at once.
    #[arg(long, env = "QUEUE_MAX_JOBS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub queue_max_jobs: u64,
}

impl QueueConfig {
    /// The Redis command timeout.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
}

impl std::fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueConfig")
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("queue_name", &self.queue_name)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("queue_max_jobs", &self.queue_max_jobs)
            .finish()
    }
}

/// A URL fit for logs: its password, and the value of any query parameter that names a password or key
/// (`?password=`, `sslpassword=`, ...), replaced by `REDACTED`. Text that does not parse as a URL is hidden
/// whole, since it could be anything.
pub fn redacted_url(raw: &str) -> String {
    const HIDDEN: &str = "REDACTED";
    let Ok(mut url) = url::Url::parse(raw) else {
        return HIDDEN.to_owned();
    };
    if url.password().is_some() {
        // Fails only for URLs that cannot have a password, which then have none.
        let _ = url.set_password(Some(HIDDEN));
    }
    let secret = |key: &str| {
        let key = key.to_ascii_lowercase();
        ["pass", "secret", "key", "token", "auth"]
            .iter()
            .any(|word| key.contains(word))
    };
    if url.query_pairs().any(|(key, _)| secret(&key)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if secret(&key) {
                    HIDDEN.to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for a log collector.
    Json,
}

/// What is logged when `RUST_LOG` does not say: info, without PostgreSQL's notices ("relation already exists,
/// skipping" on every start) and without apalis's own lines, which repeat what the worker logs once per failure.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx::postgres::notice=warn,apalis_core=off";

/// Logging settings.
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// What is logged, in `tracing` filter syntax (e.g. `info,worker=debug`).
    #[arg(long = "log", env = "RUST_LOG", default_value = DEFAULT_LOG_FILTER)]
    pub rust_log: String,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Both {
        #[command(flatten)]
        database: DatabaseConfig,
        #[command(flatten)]
        queue: QueueConfig,
    }

    #[test]
    fn debug_output_never_shows_a_password() {
        let config = Both::parse_from([
            "test",
            "--database-url",
            "postgres://app:hunter2-db@db.internal:5432/orders?sslmode=require&password=hunter3-query",
            "--redis-url",
            "rediss://:hunter4-redis@cache.internal:6380/0",
        ]);
        let printed = format!("{config:?} {config:#?}");
        for secret in ["hunter2-db", "hunter3-query", "hunter4-redis"] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
        assert!(printed.contains("db.internal:5432/orders"), "{printed}");
        assert!(printed.contains("sslmode=require"), "{printed}");
        assert!(printed.contains("app:"), "the user name stays: {printed}");
        assert!(printed.contains("cache.internal:6380"), "{printed}");
    }

    #[test]
    fn text_that_is_not_a_url_is_hidden_whole() {
        assert_eq!(redacted_url("host=db password=hunter2"), "REDACTED");
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }
}
