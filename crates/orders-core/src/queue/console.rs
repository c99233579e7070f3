//! The worker processes as the operations console lists them. Each worker process publishes a card every
//! [`PUBLISH_INTERVAL`]: a HASH (`<queue>:console:worker:<name>`) that expires after [`CARD_TTL`] unless
//! renewed, and its name in a ZSET (`<queue>:console:workers`) scored by the time of that publication, so that
//! the api finds the cards without scanning Redis's keys. A worker that stops deletes its card; one that is
//! killed stops renewing it, and it disappears within the TTL.
//!
//! The cards are ours, beside apalis's own worker registry (`<queue>:workers`), whose entries carry no host or
//! counts and outlive a killed worker by its orphan timeout.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;

use super::QueueKeys;

/// How often a worker process publishes its card.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(2);
/// How long a card lives without being renewed: three publications missed.
pub const CARD_TTL: Duration = Duration::from_secs(6);

/// What a worker process tells the console about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCard {
    /// Its name (unique per process and start, as in its logs and claim tokens).
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last published this card.
    pub last_heartbeat: DateTime<Utc>,
    /// Jobs it is running now.
    pub in_flight: u64,
    /// Orders it has completed since it started.
    pub done: u64,
}

/// Publishes (or renews) `card`, in one round trip.
pub async fn publish(
    conn: &mut ConnectionManager,
    keys: &QueueKeys,
    card: &WorkerCard,
) -> redis::RedisResult<()> {
    let key = keys.console_worker_of(&card.id);
    let now_ms = card.last_heartbeat.timestamp_millis();
    let stale_before = now_ms - CARD_TTL.as_millis() as i64;
    redis::pipe()
        .atomic()
        .hset_multiple(
            &key,
            &[
                ("id", card.id.clone()),
                ("host", card.host.clone()),
                ("started_at", card.started_at.to_rfc3339()),
                ("last_heartbeat", card.last_heartbeat.to_rfc3339()),
                ("in_flight", card.in_flight.to_string()),
                ("done", card.done.to_string()),
            ],
        )
        .ignore()
        .pexpire(&key, CARD_TTL.as_millis() as i64)
        .ignore()
        .zadd(&keys.console_workers, &card.id, now_ms)
        .ignore()
        // Names of processes killed long ago: their cards have expired.
        .zrembyscore(&keys.console_workers, "-inf", stale_before)
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// Deletes a worker's card (it is stopping).
pub async fn retire(
    conn: &mut ConnectionManager,
    keys: &QueueKeys,
    id: &str,
) -> redis::RedisResult<()> {
    redis::pipe()
        .del(keys.console_worker_of(id))
        .ignore()
        .zrem(&keys.console_workers, id)
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// The cards of the live worker processes, oldest started first: two round trips, whatever Redis holds.
pub async fn live_workers(
    conn: &mut ConnectionManager,
    keys: &QueueKeys,
    timeout: Duration,
) -> anyhow::Result<Vec<WorkerCard>> {
    let read = async {
        let since = Utc::now().timestamp_millis() - CARD_TTL.as_millis() as i64;
        let names: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&keys.console_workers)
            .arg(since)
            .arg("+inf")
            .query_async(conn)
            .await?;
        if names.is_empty() {
            return Ok::<_, redis::RedisError>(Vec::new());
        }
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.hgetall(keys.console_worker_of(name));
        }
        pipe.query_async::<Vec<std::collections::HashMap<String, String>>>(conn)
            .await
    };
    let fields = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow::anyhow!("Redis did not answer within {timeout:?}"))??;
    let mut cards: Vec<WorkerCard> = fields.iter().filter_map(card_from).collect();
    cards.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    Ok(cards)
}

/// A card from its HASH; `None` for one that expired (empty) or does not read.
fn card_from(fields: &std::collections::HashMap<String, String>) -> Option<WorkerCard> {
    let time = |name: &str| {
        DateTime::parse_from_rfc3339(fields.get(name)?)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    };
    Some(WorkerCard {
        id: fields.get("id")?.clone(),
        host: fields.get("host").cloned().unwrap_or_default(),
        started_at: time("started_at")?,
        last_heartbeat: time("last_heartbeat")?,
        in_flight: fields.get("in_flight")?.parse().ok()?,
        done: fields.get("done")?.parse().ok()?,
    })
}

/// This machine's host name, as the console shows it: the kernel's, else `HOSTNAME`, else `unknown`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}
