//! The queue contract between the api (producer) and the worker (consumer): the job type, the queue's name
//! and a bounded push. A job is only a wake-up: PostgreSQL holds the truth, so a job may be lost or delivered
//! twice and the worker still ends with each order in the right state.

use std::time::Duration;

use apalis_core::backend::TaskSink;
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use redis::aio::ConnectionManagerConfig;
use serde::{Deserialize, Serialize};

use crate::{config::QueueConfig, domain::OrderId};

/// The queue's name unless `QUEUE_NAME` says otherwise. Set explicitly: apalis would otherwise derive it
/// from the Rust type's path, which differs between crates.
pub const DEFAULT_QUEUE_NAME: &str = "orders";

/// "Move this order along." Carries only the id: the worker reads everything else from PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOrder {
    /// The order to process.
    pub order_id: OrderId,
}

/// The apalis Redis backend carrying [`ProcessOrder`] jobs.
pub type OrderQueue = RedisStorage<ProcessOrder>;

/// A Redis connection that connects on first use (so a process can start while Redis is down), reconnects on
/// its own, and fails each command after `REDIS_TIMEOUT_MS` instead of redis-rs's 500 ms default.
pub fn redis_connection(config: &QueueConfig) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(config.redis_url.as_str())
        .map_err(|err| anyhow::anyhow!("REDIS_URL is not a valid Redis URL: {err}"))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(config.redis_timeout()))
        .set_connection_timeout(Some(config.redis_timeout()))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    Ok(ConnectionManager::new_lazy_with_config(
        client,
        manager_config,
    )?)
}

/// The queue's apalis settings (the worker adds its heartbeat settings on top).
pub fn queue_settings(config: &QueueConfig) -> Config {
    Config::default().queue(&config.queue_name)
}

/// Opens the queue for pushing jobs.
pub fn order_queue(config: &QueueConfig) -> anyhow::Result<OrderQueue> {
    Ok(RedisStorage::new(redis_connection(config)?).with_config(queue_settings(config)))
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// Redis did not answer in time.
    #[error("the queue did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("the queue refused the job: {0}")]
    Push(String),
}

/// Pushes a job for `order_id`, giving up after `timeout`.
pub async fn enqueue(
    queue: &OrderQueue,
    order_id: OrderId,
    timeout: Duration,
) -> Result<(), EnqueueError> {
    let mut queue = queue.clone();
    match tokio::time::timeout(timeout, queue.push(ProcessOrder { order_id })).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(EnqueueError::Push(err.to_string())),
        Err(_) => Err(EnqueueError::Timeout(timeout)),
    }
}

/// Answers whether Redis responds to PING within `timeout`.
pub async fn ping(queue: &OrderQueue, timeout: Duration) -> bool {
    let mut conn = queue.clone().get_connection().clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut conn);
    matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)))
}
