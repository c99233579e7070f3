//! Which Redis the queue runs on: its version and its `maxmemory-policy`, read once at start, exported as the
//! `redis_server_info` gauge's labels and warned about when they put the queue at risk.
//!
//! Both come from one `INFO server memory`: unlike `CONFIG GET`, `INFO` is allowed on managed Redis services.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use tokio_util::sync::CancellationToken;

/// The oldest Redis (major, minor) the service is tested against (Debian's 7.0.15).
pub const OLDEST_TESTED_REDIS: (u32, u32) = (7, 0);

/// What a field `INFO` does not report, or reports empty, reads as.
pub const UNKNOWN: &str = "unknown";

/// The one policy under which Redis never drops a key to make room.
const NOEVICTION: &str = "noeviction";

/// How long [`spawn_check`] waits between attempts while Redis does not answer.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// The gauge [`report`] sets.
const INFO_GAUGE: &str = "redis_server_info";

/// The Redis server as its `INFO` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisServer {
    /// `redis_version`, such as `7.0.15`, or [`UNKNOWN`].
    pub version: String,
    /// `maxmemory_policy`, such as `noeviction`, or [`UNKNOWN`].
    pub maxmemory_policy: String,
}

impl RedisServer {
    /// Reads the server from the text of `INFO server memory`. A field missing or empty is [`UNKNOWN`].
    pub fn from_info(info: &str) -> Self {
        let field = |name: &str| {
            info.lines()
                .filter(|line| !line.starts_with('#'))
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .unwrap_or(UNKNOWN)
                .to_owned()
        };
        Self {
            version: field("redis_version"),
            maxmemory_policy: field("maxmemory_policy"),
        }
    }

    /// Whether Redis may drop keys under memory pressure: any policy but `noeviction`, an unknown one included.
    pub fn may_evict(&self) -> bool {
        self.maxmemory_policy != NOEVICTION
    }

    /// Whether its version is older than [`OLDEST_TESTED_REDIS`]; `false` when the version cannot be read.
    pub fn older_than_tested(&self) -> bool {
        major_minor(&self.version).is_some_and(|version| version < OLDEST_TESTED_REDIS)
    }
}

/// The (major, minor) of a version such as `7.0.15`; `None` unless it starts with two numbers.
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?;
    let digits = minor
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(minor.len());
    Some((major, minor[..digits].parse().ok()?))
}

/// Why [`inspect`] could not read the server.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Redis did not answer in time.
    #[error("Redis did not answer INFO within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("INFO failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Reads the server's version and eviction policy in one `INFO` round trip, within `timeout`.
pub async fn inspect(
    conn: &mut impl ConnectionLike,
    timeout: Duration,
) -> Result<RedisServer, InspectError> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("server").arg("memory");
    match tokio::time::timeout(timeout, cmd.query_async::<String>(conn)).await {
        Ok(info) => Ok(RedisServer::from_info(&info?)),
        Err(_) => Err(InspectError::Timeout(timeout)),
    }
}

/// Sets `redis_server_info{version, maxmemory_policy}` to 1, and logs a warning when Redis may evict keys and
/// another when it is older than [`OLDEST_TESTED_REDIS`]. `process` names the process in those lines.
pub fn report(server: &RedisServer, process: &str) {
    // The gauge is kept only if the recorder exists when it is set.
    crate::telemetry::prometheus();
    metrics::describe_gauge!(
        INFO_GAUGE,
        "Always 1; its labels are the Redis server's version and maxmemory-policy, as read at start"
    );
    metrics::gauge!(
        INFO_GAUGE,
        "version" => server.version.clone(),
        "maxmemory_policy" => server.maxmemory_policy.clone(),
    )
    .set(1.0);
    if server.may_evict() {
        tracing::warn!(
            process,
            maxmemory_policy = %server.maxmemory_policy,
            "Redis's maxmemory-policy is {}, not noeviction: Redis may evict keys under memory pressure, queue \
             entries among them. Unreadable entries are repaired or dropped and their orders re-driven from \
             PostgreSQL, but only after a delay. Set `maxmemory-policy noeviction`",
            server.maxmemory_policy
        );
    }
    if server.older_than_tested() {
        let (major, minor) = OLDEST_TESTED_REDIS;
        tracing::warn!(
            process,
            version = %server.version,
            "Redis {} is older than any version the service is tested with ({major}.{minor} and later); \
             upgrade Redis",
            server.version
        );
    }
}

/// Reads the server in the background and [`report`]s it once: one attempt every 2 s (Redis may be down at
/// start) until one succeeds or `stop` is cancelled. Failed attempts are logged at debug level only: an outage
/// is reported by whatever else uses Redis.
pub fn spawn_check(
    mut conn: ConnectionManager,
    timeout: Duration,
    process: &'static str,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let attempt = tokio::select! {
                () = stop.cancelled() => return,
                attempt = inspect(&mut conn, timeout) => attempt,
            };
            match attempt {
                Ok(server) => {
                    report(&server, process);
                    return;
                }
                Err(err) => {
                    tracing::debug!(error = %err, "cannot read the Redis version and maxmemory-policy yet; retrying")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RETRY_INTERVAL) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{OLDEST_TESTED_REDIS, RedisServer, UNKNOWN, major_minor};

    /// The shape of `INFO server memory` from Redis 7.0.15 (abridged).
    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\nredis_mode:standalone\r\n\
                        \r\n# Memory\r\nused_memory:1005616\r\nmaxmemory:0\r\nmaxmemory_human:0B\r\n\
                        maxmemory_policy:allkeys-lru\r\nallocator_frag_ratio:1.00\r\n";

    fn server(version: &str, maxmemory_policy: &str) -> RedisServer {
        RedisServer {
            version: version.into(),
            maxmemory_policy: maxmemory_policy.into(),
        }
    }

    #[test]
    fn info_gives_the_version_and_the_policy() {
        assert_eq!(
            RedisServer::from_info(INFO),
            server("7.0.15", "allkeys-lru")
        );
    }

    #[test]
    fn a_field_missing_or_empty_is_unknown() {
        let info =
            "# Server\r\nredis_version:\r\nredis_version_extra:8\r\n# Memory\r\nmaxmemory:0\r\n";
        assert_eq!(RedisServer::from_info(info), server(UNKNOWN, UNKNOWN));
        assert_eq!(RedisServer::from_info(""), server(UNKNOWN, UNKNOWN));
    }

    #[test]
    fn versions_compare_by_major_then_minor() {
        assert_eq!(major_minor("7.0.15"), Some((7, 0)));
        assert_eq!(major_minor("7.2.4"), Some((7, 2)));
        assert_eq!(major_minor("10.1"), Some((10, 1)));
        assert_eq!(major_minor("7.0-rc1"), Some((7, 0)));
        for unreadable in [UNKNOWN, "", "7", "7.x", "x.0.1"] {
            assert_eq!(major_minor(unreadable), None, "{unreadable}");
        }
        assert_eq!(OLDEST_TESTED_REDIS, (7, 0));
        assert!(server("6.2.14", "noeviction").older_than_tested());
        assert!(server("5.0.7", "noeviction").older_than_tested());
        for tested in ["7.0.0", "7.0.15", "7.2.4", "8.0.2", "10.0.0", UNKNOWN] {
            assert!(
                !server(tested, "noeviction").older_than_tested(),
                "{tested}"
            );
        }
    }

    #[test]
    fn every_policy_but_noeviction_may_evict() {
        assert!(!server("7.0.15", "noeviction").may_evict());
        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "allkeys-random",
            "volatile-ttl",
            UNKNOWN,
        ] {
            assert!(server("7.0.15", policy).may_evict(), "{policy}");
        }
    }
}
