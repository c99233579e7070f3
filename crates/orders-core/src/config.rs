//! Configuration parts shared by both binaries. Each is a `clap::Args` group read from flags or the
//! environment, so `api --help` and `worker --help` document every variable.

use std::time::Duration;

use clap::{Args, ValueEnum};

/// Where PostgreSQL is and how long to wait for it.
#[derive(Debug, Clone, Args)]
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
}

impl DatabaseConfig {
    /// The pool acquire timeout.
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.database_acquire_timeout_ms)
    }
}

/// Where the Redis queue is.
#[derive(Debug, Clone, Args)]
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

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for a log collector.
    Json,
}

/// Logging settings. The filter itself comes from `RUST_LOG` (default `info`).
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}
