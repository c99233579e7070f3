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
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub queue: QueueConfig,

    #[command(flatten)]
    pub log: LogConfig,

    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0:8000")]
    pub bind_addr: SocketAddr,

    /// Where `GET /metrics` (Prometheus) is served: its own listener, kept off the public port, on loopback unless
    /// set otherwise (e.g. 0.0.0.0:9100 for a scraper on another host); `off` to disable.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9100")]
    pub metrics_addr: String,

    /// Longest wait for a request's headers, in milliseconds, from a connection's start or the end of its previous
    /// response: a client that sends part of a request and stops, or an idle keep-alive connection, is closed then.
    /// Keep it above the idle timeout of a load balancer that reuses connections.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub http_header_timeout_ms: u64,

    /// Most connections open at once on BIND_ADDR; one more is answered 503 with Retry-After and closed. Unset:
    /// the open-file limit (raised to its hard limit at start) less a reserve for the pools, Redis and logs.
    #[arg(long, env = "MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Secret that signs the JWTs; at least 32 bytes. Required to serve (not for `api migrate`).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: Option<SecretString>,

    /// JWT signing algorithm: HS256, HS384 or HS512.
    #[arg(long, env = "JWT_ALGORITHM", default_value = "HS256")]
    pub jwt_algorithm: String,

    /// Lifetime of an access token, in minutes.
    #[arg(long, env = "ACCESS_TOKEN_EXPIRE_MINUTES", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=1440))]
    pub access_token_expire_minutes: u64,

    /// Lifetime of a refresh token (and of a session without activity), in days.
    #[arg(long, env = "REFRESH_TOKEN_EXPIRE_DAYS", default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=365))]
    pub refresh_token_expire_days: u64,

    /// Longest a session lasts from its login, in days, however often it is refreshed; then the user logs in
    /// again.
    #[arg(long, env = "SESSION_MAX_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub session_max_days: u64,

    /// Login attempts at one account (by email, whether or not it exists) allowed per client and 15-minute window;
    /// past it that client's logins of that account answer 429 until the window ends, and a successful login
    /// resets its count. Over all clients the account gets ten times as many; past those, only clients that have
    /// not tried it in their window still have their password checked.
    #[arg(long, env = "LOGIN_MAX_FAILURES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub login_max_failures: u32,

    /// How many reverse proxies you control sit in front of the api, each appending the address it saw to
    /// X-Forwarded-For: the client is then the Nth entry from the right (0: the header is ignored and the peer
    /// address counts). Never more than the proxies really there, or clients could pick their own address.
    #[arg(long, env = "TRUST_PROXY_HOPS", value_parser = clap::value_parser!(u8).range(0..=16))]
    pub trust_proxy_hops: Option<u8>,

    /// Older form of TRUST_PROXY_HOPS=1 (true) or 0 (false); TRUST_PROXY_HOPS wins when both are set.
    #[arg(long, env = "TRUST_PROXY_HEADERS", default_value_t = false, value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub trust_proxy_headers: bool,

    #[command(flatten)]
    pub rate_limits: RateLimits,

    /// How long creating an order waits for the queue before leaving the job to the reconciler (milliseconds).
    #[arg(long, env = "ENQUEUE_TIMEOUT_MS", default_value_t = 1000)]
    pub enqueue_timeout_ms: u64,

    /// Most creates, and most list reads, waiting for a database statement on this process (each kind its own
    /// queue); one more is answered 503 with Retry-After at once, before anything is written.
    #[arg(long, env = "BATCH_MAX_WAITING", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_max_waiting: u32,

    /// Also run the queue worker (and its reconciler) inside this process: the whole system in one command.
    /// Run standalone `worker` processes instead to scale out.
    #[arg(long, env = "WITH_WORKER", default_value_t = false, value_parser = BoolishValueParser::new(), action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub with_worker: bool,

    #[command(flatten)]
    pub worker: worker::WorkerSettings,

    /// Most event streams (GET /orders/{id}/events, GET /orders/events) one user may hold open, over every api
    /// process with the same QUEUE_NAME (counted in Redis; while Redis does not answer, per process); one more is
    /// answered 429.
    #[arg(long, env = "SSE_MAX_STREAMS_PER_USER", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub sse_max_streams_per_user: u32,

    /// Longest life of one event stream, in seconds: the stream then ends as one does when its token expires, and
    /// the client reconnects with Last-Event-ID and loses nothing. Unset: a stream lasts as long as its
    /// authority (and an order's stream until the order is finished). Meant for tests that must see every stream
    /// end, such as scripts/schemathesis.
    #[arg(long, env = "SSE_MAX_STREAM_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub sse_max_stream_seconds: Option<u64>,

    /// Where the live-status listener connects (LISTEN needs a session of its own): unset, DATABASE_URL. Set it to
    /// the server itself when DATABASE_URL goes through PgBouncer in transaction mode, where LISTEN does not work.
    #[arg(long, env = "DATABASE_LISTEN_URL", hide_env_values = true)]
    pub database_listen_url: Option<String>,

    /// Most event streams this process holds open in all; one more is answered 503.
    #[arg(long, env = "SSE_MAX_STREAMS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub sse_max_streams: u32,

    /// How often each api process recomputes the admin overview (GET /admin/overview and its event stream), in
    /// milliseconds. Each refresh is a few index reads, and a full count of the finished orders every 10 minutes.
    #[arg(long, env = "ADMIN_OVERVIEW_REFRESH_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub admin_overview_refresh_ms: u64,

    /// Most password hashes computed at once (each takes 19 MiB); 0 means one per CPU core.
    #[arg(long, env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 0)]
    pub password_hash_concurrency: usize,
}

/// What to do instead of serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Apply pending database migrations and exit (for a deploy that migrates before it rolls the replicas;
    /// then start them with MIGRATE_ON_START=false). Needs only the database settings.
    Migrate,
    /// GET one URL and exit 0 if it answers 2xx within the timeout, 1 otherwise: a container's healthcheck, in an
    /// image with no curl or wget. Needs no other setting.
    Healthcheck {
        /// The URL, plain http://; a worker's is http://127.0.0.1:9000/health (its WORKER_METRICS_ADDR). Default:
        /// /health/live on BIND_ADDR, with 127.0.0.1 for 0.0.0.0 (and ::1 for ::).
        #[arg(long)]
        url: Option<String>,
        /// Longest wait for the connection and the answer's status line, in milliseconds.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        timeout_ms: u64,
    },
    /// Manage users' roles for the operations console (the admin API). Needs only the database settings.
    Users {
        #[command(subcommand)]
        action: UsersCommand,
    },
}

/// `api users ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum UsersCommand {
    /// Give the user with EMAIL the role ROLE: `customer` (no admin access, every account's default), `viewer`
    /// (reads the admin API) or `operator` (also re-drives and cancels orders there). Takes effect at the user's
    /// next admin request. Prints the change; exits 1 for an unknown email or role.
    SetRole {
        /// The user's email (case-insensitive).
        email: String,
        /// customer, viewer or operator.
        role: String,
    },
}

/// Per-client request limits: a burst of N, refilled at N per minute. 0 turns one limit off.
#[derive(Debug, Clone, clap::Args)]
pub struct RateLimits {
    /// Turn every rate limit on or off (for load tests).
    #[arg(long, env = "RATE_LIMIT_ENABLED", default_value_t = true, value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub rate_limit_enabled: bool,

    /// Count the limits in Redis, shared by every api process with the same QUEUE_NAME (off: each process counts
    /// its own). Each process's own limiter stays behind the shared one, and decides alone while Redis does not
    /// answer.
    #[arg(long, env = "RATE_LIMIT_SHARED", default_value_t = true, value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub rate_limit_shared: bool,

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

    /// GET /orders/{id} per client per minute (polling an order's status once a second fits).
    #[arg(long, env = "RATE_LIMIT_GET_ORDER_PER_MINUTE", default_value_t = 60)]
    pub rate_limit_get_order_per_minute: u32,

    /// PATCH /orders/{id}/cancel per client per minute.
    #[arg(long, env = "RATE_LIMIT_CANCEL_ORDER_PER_MINUTE", default_value_t = 10)]
    pub rate_limit_cancel_order_per_minute: u32,

    /// Event streams opened (GET /orders/{id}/events and /orders/events together) per minute, per client and per
    /// user.
    #[arg(long, env = "RATE_LIMIT_OPEN_STREAM_PER_MINUTE", default_value_t = 30)]
    pub rate_limit_open_stream_per_minute: u32,

    /// Reads of the admin API (GET /admin/...) per client per minute, all routes together.
    #[arg(long, env = "RATE_LIMIT_ADMIN_PER_MINUTE", default_value_t = 300)]
    pub rate_limit_admin_per_minute: u32,

    /// Operator actions through the admin API (POST /admin/...: re-drive, cancel) per client per minute.
    #[arg(long, env = "RATE_LIMIT_ADMIN_ACTION_PER_MINUTE", default_value_t = 30)]
    pub rate_limit_admin_action_per_minute: u32,
}

impl RateLimits {
    /// No limits at all.
    pub fn off() -> Self {
        Self {
            rate_limit_enabled: false,
            rate_limit_shared: false,
            rate_limit_register_per_minute: 0,
            rate_limit_login_per_minute: 0,
            rate_limit_refresh_per_minute: 0,
            rate_limit_create_order_per_minute: 0,
            rate_limit_list_orders_per_minute: 0,
            rate_limit_get_order_per_minute: 0,
            rate_limit_cancel_order_per_minute: 0,
            rate_limit_open_stream_per_minute: 0,
            rate_limit_admin_per_minute: 0,
            rate_limit_admin_action_per_minute: 0,
        }
    }
}

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}

/// File descriptors kept for what is not a client connection: the pools, Redis, the listener, logs.
const FD_RESERVE: usize = 1024;
/// The connection limit where the open-file limit cannot be read.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The request timeout when the budgets above add up to less.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(4500);

/// The shortest secret accepted: HMAC keys need at least as many bytes as the hash output (RFC 8725 §3.5).
pub const MIN_SECRET_LEN: usize = 32;

/// A setting that makes the service refuse to start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "JWT_SECRET must be at least {MIN_SECRET_LEN} bytes long (it is {0}); generate one with `openssl rand -hex 32`"
    )]
    SecretTooShort(usize),
    #[error(
        "JWT_SECRET is not set: put it in the environment or in a .env file in the working directory (generate one with `openssl rand -hex 32`)"
    )]
    MissingSecret,
    #[error("JWT_ALGORITHM must be HS256, HS384 or HS512 (got {0:?})")]
    UnsupportedAlgorithm(String),
    #[error(transparent)]
    Worker(#[from] worker::config::SettingsError),
}

impl Config {
    /// Checks what clap cannot: the secret's length and the algorithm. The secret itself is never printed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let len = self.jwt_secret()?.expose_secret().len();
        if len < MIN_SECRET_LEN {
            return Err(ConfigError::SecretTooShort(len));
        }
        self.algorithm()?;
        if self.with_worker {
            self.worker.validate()?;
        }
        Ok(())
    }

    /// The JWT signing secret.
    pub fn jwt_secret(&self) -> Result<&SecretString, ConfigError> {
        self.jwt_secret.as_ref().ok_or(ConfigError::MissingSecret)
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

    /// Longest life of a session.
    pub fn session_max(&self) -> Duration {
        Duration::from_secs(self.session_max_days * 24 * 60 * 60)
    }

    /// How many trusted proxies append to X-Forwarded-For: `TRUST_PROXY_HOPS`, else 1 for
    /// `TRUST_PROXY_HEADERS=true`, else 0.
    pub fn proxy_hops(&self) -> u8 {
        self.trust_proxy_hops
            .unwrap_or(u8::from(self.trust_proxy_headers))
    }

    /// The limits of the public listener's connections. Without `MAX_CONNECTIONS`, raises the process's open-file
    /// limit to its hard limit and keeps `FD_RESERVE` (or a quarter of a small limit) of it for everything else.
    pub fn connection_limits(&self) -> crate::serve::Limits {
        let max_connections = match self.max_connections {
            Some(max) => max as usize,
            None => {
                let files = rlimit::increase_nofile_limit(u64::MAX)
                    .map_or(DEFAULT_MAX_CONNECTIONS, |files| files as usize);
                files.saturating_sub(FD_RESERVE.min(files / 4)).max(16)
            }
        };
        crate::serve::Limits {
            header_timeout: Duration::from_millis(self.http_header_timeout_ms),
            max_connections,
        }
    }

    /// How long a request may take before it is answered 503. It covers the longest path that commits something
    /// and must then answer with it, a create: reading the queue's room, a wait for a connection, the insert
    /// (one statement), then the push. A create that committed is therefore answered 201, never 503; one whose
    /// insert has not committed when only the push and half a second are left is answered 503 and never inserted.
    pub fn request_timeout(&self) -> Duration {
        let create = self.enqueue_timeout()
            + self.database.acquire_timeout()
            + self.database.statement_timeout()
            + self.enqueue_timeout()
            + Duration::from_millis(500);
        create.max(MIN_REQUEST_TIMEOUT)
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("command", &self.command)
            .field("database", &self.database)
            .field("queue", &self.queue)
            .field("bind_addr", &self.bind_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("trust_proxy_hops", &self.trust_proxy_hops)
            .field("trust_proxy_headers", &self.trust_proxy_headers)
            .field("with_worker", &self.with_worker)
            .field("rate_limits", &self.rate_limits)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Config;

    fn hops(args: &[&str]) -> u8 {
        let mut argv = vec!["api", "--jwt-secret", "a-test-secret-of-thirty-two-bytes"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap().proxy_hops()
    }

    #[test]
    fn trust_proxy_hops_wins_over_the_older_boolean() {
        assert_eq!(hops(&[]), 0);
        assert_eq!(hops(&["--trust-proxy-headers", "true"]), 1);
        assert_eq!(hops(&["--trust-proxy-hops", "2"]), 2);
        assert_eq!(
            hops(&["--trust-proxy-headers", "true", "--trust-proxy-hops", "0"]),
            0
        );
    }
}
