//! The queue contract between the api (producer) and the worker (consumer): the job type, the queue's name
//! and bounded pushes. A job is only a wake-up: PostgreSQL holds the truth, so a job may be lost or delivered
//! twice and the worker still ends with each order in the right state.
//!
//! PostgreSQL is also the queue of record, so Redis holds at most `QUEUE_MAX_JOBS` waiting jobs: past that,
//! orders wait in PostgreSQL and the worker's reconciler feeds them in, oldest first, as the queue drains. The
//! bound keeps Redis's memory in proportion to the work in hand rather than to the backlog, and it keeps
//! apalis-redis working: its fetch script promotes every due scheduled job with one Lua `unpack`, which fails
//! for good above about 8,000 ids.

pub mod console;
pub mod gauges;
pub mod keys;
pub mod server;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use apalis_core::backend::TaskSink;
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use redis::aio::ConnectionManagerConfig;
use serde::{Deserialize, Serialize};

pub use self::keys::QueueKeys;
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
    Ok(OrderQueue::new(redis_connection(config)?, config))
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

/// What became of a new order's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Its job goes to Redis now (push it).
    Pushed,
    /// Redis holds `QUEUE_MAX_JOBS` jobs already, or older orders are waiting in PostgreSQL for room: the
    /// order waits its turn there, and the reconciler pushes it.
    Deferred,
}

/// What the queue holds, as one round trip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Jobs ready to be fetched.
    pub active: u64,
    /// Jobs due later (fresh pushes until a worker's next fetch promotes them, and retries).
    pub scheduled: u64,
    /// Whether the reconciler has orders waiting in PostgreSQL for room.
    pub backlog: bool,
}

impl QueueDepth {
    /// Jobs waiting in Redis: the quantity `QUEUE_MAX_JOBS` bounds.
    pub fn waiting(&self) -> u64 {
        self.active + self.scheduled
    }
}

/// The order queue: apalis's Redis storage for [`ProcessOrder`] jobs, with its key layout and its bound.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct OrderQueue {
    storage: RedisStorage<ProcessOrder>,
    keys: Arc<QueueKeys>,
    max_jobs: u64,
    admissions: Arc<Admissions>,
}

/// How long one reading of the queue's depth admits new orders without asking Redis again.
pub const ADMISSION_WINDOW: Duration = Duration::from_millis(50);
/// Most new orders one reading admits. Several api processes reading the same room at once can overshoot
/// `QUEUE_MAX_JOBS` together by at most this much each.
pub const ADMISSION_BUDGET: u64 = 250;

/// What the last reading of the queue's depth still admits, shared by this process's requests.
#[derive(Debug, Default)]
struct Admissions(Mutex<Reading>);

#[derive(Debug, Default)]
struct Reading {
    at: Option<Instant>,
    /// Whether the queue had room and no backlog.
    open: bool,
    /// Pushes this reading still admits.
    budget: u64,
}

impl Admissions {
    fn reading(&self) -> std::sync::MutexGuard<'_, Reading> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Some(admitted)` while the last reading is fresh and decides; `None` when Redis must be read again.
    fn admit_from_last_reading(&self) -> Option<bool> {
        let mut reading = self.reading();
        if reading.at.is_none_or(|at| at.elapsed() >= ADMISSION_WINDOW) {
            return None;
        }
        if !reading.open {
            return Some(false);
        }
        reading.budget = reading.budget.checked_sub(1)?;
        Some(true)
    }

    /// Records a fresh reading and decides on one order with it.
    fn admit_from(&self, depth: QueueDepth, max_jobs: u64) -> bool {
        let room = max_jobs.saturating_sub(depth.waiting());
        let mut reading = self.reading();
        reading.at = Some(Instant::now());
        reading.open = !depth.backlog && room > 0;
        reading.budget = if reading.open {
            room.min(ADMISSION_BUDGET) - 1
        } else {
            0
        };
        reading.open
    }
}

impl OrderQueue {
    /// The queue `config` names, over `connection`.
    pub fn new(connection: ConnectionManager, config: &QueueConfig) -> Self {
        let settings = queue_settings(config);
        Self {
            keys: Arc::new(QueueKeys::new(&settings)),
            storage: RedisStorage::new(connection).with_config(settings),
            max_jobs: config.queue_max_jobs,
            admissions: Arc::default(),
        }
    }

    /// Its Redis keys.
    pub fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    /// Most jobs waiting in Redis (`QUEUE_MAX_JOBS`).
    pub fn max_jobs(&self) -> u64 {
        self.max_jobs
    }

    /// A handle on its Redis connection (cheap: connections are shared and reconnect on their own).
    pub fn connection(&self) -> ConnectionManager {
        self.storage.clone().get_connection().clone()
    }

    /// Reads how many jobs wait, and whether a backlog is being fed, in one round trip.
    pub async fn depth(&self, timeout: Duration) -> Result<QueueDepth, EnqueueError> {
        let mut conn = self.connection();
        let mut pipe = redis::pipe();
        pipe.llen(&self.keys.active)
            .zcard(&self.keys.scheduled)
            .exists(&self.keys.backlog);
        match tokio::time::timeout(timeout, pipe.query_async::<(u64, u64, bool)>(&mut conn)).await {
            Ok(Ok((active, scheduled, backlog))) => Ok(QueueDepth {
                active,
                scheduled,
                backlog,
            }),
            Ok(Err(err)) => Err(EnqueueError::Push(err.to_string())),
            Err(_) => Err(EnqueueError::Timeout(timeout)),
        }
    }

    /// Decides whether a new order's job goes to Redis now: yes while the queue has room and no older order
    /// waits in PostgreSQL for room. The room is read from Redis at most once per [`ADMISSION_WINDOW`] or per
    /// [`ADMISSION_BUDGET`] admissions, not once per order. `timeout` bounds the reading.
    pub async fn admit(&self, timeout: Duration) -> Result<Admission, EnqueueError> {
        let admitted = match self.admissions.admit_from_last_reading() {
            Some(admitted) => admitted,
            None => {
                let depth = self.depth(timeout).await?;
                self.admissions.admit_from(depth, self.max_jobs)
            }
        };
        Ok(if admitted {
            Admission::Pushed
        } else {
            Admission::Deferred
        })
    }

    /// Pushes one order's job, within `timeout`.
    pub async fn push(&self, order_id: OrderId, timeout: Duration) -> Result<(), EnqueueError> {
        let mut storage = self.storage.clone();
        match tokio::time::timeout(timeout, storage.push(ProcessOrder { order_id })).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(EnqueueError::Push(err.to_string())),
            Err(_) => Err(EnqueueError::Timeout(timeout)),
        }
    }

    /// Pushes one job per order, all in one round trip, whatever the queue holds (the caller keeps the
    /// bound: the reconciler pushes only as many as there is room for).
    pub async fn push_orders(
        &self,
        order_ids: &[OrderId],
        timeout: Duration,
    ) -> Result<(), EnqueueError> {
        if order_ids.is_empty() {
            return Ok(());
        }
        let jobs = order_ids
            .iter()
            .map(|&order_id| ProcessOrder { order_id })
            .collect();
        let mut storage = self.storage.clone();
        match tokio::time::timeout(timeout, storage.push_bulk(jobs)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(EnqueueError::Push(err.to_string())),
            Err(_) => Err(EnqueueError::Timeout(timeout)),
        }
    }

    /// Answers whether Redis responds to PING within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let mut conn = self.connection();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::{ADMISSION_BUDGET, Admissions, QueueDepth};

    fn depth(waiting: u64, backlog: bool) -> QueueDepth {
        QueueDepth {
            active: waiting,
            scheduled: 0,
            backlog,
        }
    }

    #[test]
    fn a_reading_admits_no_more_than_the_room_it_saw_then_asks_again() {
        let admissions = Admissions::default();
        assert_eq!(admissions.admit_from_last_reading(), None);
        assert!(admissions.admit_from(depth(7, false), 10));
        assert_eq!(admissions.admit_from_last_reading(), Some(true));
        assert_eq!(admissions.admit_from_last_reading(), Some(true));
        assert_eq!(admissions.admit_from_last_reading(), None);
    }

    #[test]
    fn a_reading_admits_at_most_the_budget_however_large_the_room() {
        let admissions = Admissions::default();
        assert!(admissions.admit_from(depth(0, false), 5000));
        let admitted = std::iter::from_fn(|| admissions.admit_from_last_reading())
            .take(10_000)
            .count() as u64;
        assert_eq!(admitted + 1, ADMISSION_BUDGET);
    }

    #[test]
    fn a_full_queue_or_a_backlog_defers_until_the_next_reading() {
        let admissions = Admissions::default();
        assert!(!admissions.admit_from(depth(10, false), 10));
        assert_eq!(admissions.admit_from_last_reading(), Some(false));
        assert!(!admissions.admit_from(depth(0, true), 10));
        assert_eq!(admissions.admit_from_last_reading(), Some(false));
    }
}
