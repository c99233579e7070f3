//! The api's configuration: flags or environment variables (a `.env` file is read first), all listed by
//! `api --help`. Checked once at start, so a bad secret stops the process with a clear message instead of
//! failing on the first request.

use std::{net::SocketAddr, time::Duration};

use clap::{ArgAction, Parser, builder::BoolishValueParser};
use orders_core::config::{DatabaseConfig, LogConfig, QueueConfig};
use secrecy::{ExposeSecret, SecretString};

/// The orders HTTP API: accounts, JWT sessions and orders, backed by PostgreSQL and a Redis job queue.
#[derive(Clone, Parser)]
#[command(name = "api", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub queue: QueueConfig,

    #[command(flatten)]
    pub log: LogConfig,

    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0:8000")]
    pub bind_addr: SocketAddr,

    /// Secret that signs the JWTs; at least 32 bytes. Required.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: SecretString,

    /// JWT signing algorithm: HS256, HS384 or HS512.
    #[arg(long, env = "JWT_ALGORITHM", default_value = "HS256")]
    pub jwt_algorithm: String,

    /// Lifetime of an access token, in minutes.
    #[arg(long, env = "ACCESS_TOKEN_EXPIRE_MINUTES", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=1440))]
    pub access_token_expire_minutes: u64,

    /// Lifetime of a refresh token (and of a session without activity), in days.
    #[arg(long, env = "REFRESH_TOKEN_EXPIRE_DAYS", default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=365))]
    pub refresh_token_expire_days: u64,

    /// Take the client's address for rate limiting from the rightmost X-Forwarded-For entry. Only behind a
    /// reverse proxy you control, which appends the address it saw; otherwise clients could pick their own.
    #[arg(long, env = "TRUST_PROXY_HEADERS", default_value_t = false, value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub trust_proxy_headers: bool,

    #[command(flatten)]
    pub rate_limits: RateLimits,

    /// How long creating an order waits for the queue before leaving the job to the reconciler (milliseconds).
    #[arg(long, env = "ENQUEUE_TIMEOUT_MS", default_value_t = 1000)]
    pub enqueue_timeout_ms: u64,

    /// Also run the queue worker (and its reconciler) inside this process: the whole system in one command.
    /// Run standalone `worker` processes instead to scale out.
    #[arg(long, env = "WITH_WORKER", default_value_t = false, value_parser = BoolishValueParser::new(), action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub with_worker: bool,

    #[command(flatten)]
    pub worker: worker::WorkerSettings,

    /// Most password hashes computed at once (each takes 19 MiB); 0 means one per CPU core.
    #[arg(long, env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 0)]
    pub password_hash_concurrency: usize,
}

/// Per-client request limits: a burst of N, refilled at N per minute. 0 turns one limit off.
#[derive(Debug, Clone, clap::Args)]
pub struct RateLimits {
    /// Turn every rate limit on or off (for load tests).
    #[arg(long, env = "RATE_LIMIT_ENABLED", default_value_t = true, value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub rate_limit_enabled: bool,

    /// POST /auth/register per client per minute.
    #[arg(long, env = "RATE_LIMIT_REGISTER_PER_MINUTE", default_value_t = 5)]
    pub rate_limit_register_per_minute: u32,

    /// POST /auth/login per client per minute.
    #[arg(long, env = "RATE_LIMIT_LOGIN_PER_MINUTE", default_value_t = 5)]
    pub rate_limit_login_per_minute: u32,

    /// POST /auth/refresh per client per minute.
    #[arg(long, env = "RATE_LIMIT_REFRESH_PER_MINUTE", default_value_t = 10)]
    pub rate_limit_refresh_per_minute: u32,

    /// POST /orders/create per client per minute.
    #[arg(long, env = "RATE_LIMIT_CREATE_ORDER_PER_MINUTE", default_value_t = 20)]
    pub rate_limit_create_order_per_minute: u32,

    /// GET /orders/my-orders per client per minute.
    #[arg(long, env = "RATE_LIMIT_LIST_ORDERS_PER_MINUTE", default_value_t = 30)]
    pub rate_limit_list_orders_per_minute: u32,

    /// PATCH /orders/{id}/cancel per client per minute.
    #[arg(long, env = "RATE_LIMIT_CANCEL_ORDER_PER_MINUTE", default_value_t = 10)]
    pub rate_limit_cancel_order_per_minute: u32,
}

impl RateLimits {
    /// No limits at all.
    pub fn off() -> Self {
        Self {
            rate_limit_enabled: false,
            rate_limit_register_per_minute: 0,
            rate_limit_login_per_minute: 0,
            rate_limit_refresh_per_minute: 0,
            rate_limit_create_order_per_minute: 0,
            rate_limit_list_orders_per_minute: 0,
            rate_limit_cancel_order_per_minute: 0,
        }
    }
}

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}

/// The shortest secret accepted: HMAC keys need at least as many bytes as the hash output (RFC 8725 §3.5).
pub const MIN_SECRET_LEN: usize = 32;

/// A setting that makes the service refuse to start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "JWT_SECRET must be at least {MIN_SECRET_LEN} bytes long (it is {0}); generate one with `openssl rand -hex 32`"
    )]
    SecretTooShort(usize),
    #[error("JWT_ALGORITHM must be HS256, HS384 or HS512 (got {0:?})")]
    UnsupportedAlgorithm(String),
    #[error(transparent)]
    Worker(#[from] worker::config::SettingsError),
}

impl Config {
    /// Checks what clap cannot: the secret's length and the algorithm. The secret itself is never printed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let len = self.jwt_secret.expose_secret().len();
        if len < MIN_SECRET_LEN {
            return Err(ConfigError::SecretTooShort(len));
        }
        self.algorithm()?;
        if self.with_worker {
            self.worker.validate()?;
        }
        Ok(())
    }

    /// The JWT algorithm, one of the HMAC family.
    pub fn algorithm(&self) -> Result<jsonwebtoken::Algorithm, ConfigError> {
        match self.jwt_algorithm.as_str() {
            "HS256" => Ok(jsonwebtoken::Algorithm::HS256),
            "HS384" => Ok(jsonwebtoken::Algorithm::HS384),
            "HS512" => Ok(jsonwebtoken::Algorithm::HS512),
            other => Err(ConfigError::UnsupportedAlgorithm(other.to_owned())),
        }
    }

    /// Lifetime of access tokens.
    pub fn access_ttl(&self) -> Duration {
        Duration::from_secs(self.access_token_expire_minutes * 60)
    }

    /// Lifetime of refresh tokens.
    pub fn refresh_ttl(&self) -> Duration {
        Duration::from_secs(self.refresh_token_expire_days * 24 * 60 * 60)
    }

    /// How long a create waits for the queue.
    pub fn enqueue_timeout(&self) -> Duration {
        Duration::from_millis(self.enqueue_timeout_ms)
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("bind_addr", &self.bind_addr)
            .field("queue_name", &self.queue.queue_name)
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("trust_proxy_headers", &self.trust_proxy_headers)
            .field("with_worker", &self.with_worker)
            .field("rate_limits", &self.rate_limits)
            .finish_non_exhaustive()
    }
}
