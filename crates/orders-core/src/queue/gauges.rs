//! Backpressure, visible: how much work waits in Redis and in PostgreSQL. Both processes serve these gauges on
//! their `/metrics`, sampled when scraped (at most once a second, since `/metrics` needs no login).

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

use super::OrderQueue;
use crate::db::orders as db;

/// How long one sample may wait for each of PostgreSQL and Redis.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Scrapes closer together than this share one sample.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Describes the gauges (call once per process, before the first scrape).
pub fn describe() {
    metrics::describe_gauge!(
        "queue_jobs_waiting",
        "Jobs waiting in Redis (active + scheduled); bounded by QUEUE_MAX_JOBS"
    );
    metrics::describe_gauge!(
        "orders_pending",
        "PENDING orders in PostgreSQL (in Redis or waiting for room there)"
    );
    metrics::describe_gauge!(
        "orders_oldest_pending_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest PENDING order (0 when none)"
    );
}

/// Samples the backlog gauges on demand, at most once per second.
#[derive(Debug)]
pub struct BacklogGauges {
    db: PgPool,
    queue: OrderQueue,
    last: Mutex<Option<Instant>>,
}

impl BacklogGauges {
    /// Gauges over this database and queue.
    pub fn new(db: PgPool, queue: OrderQueue) -> Self {
        describe();
        Self {
            db,
            queue,
            last: Mutex::new(None),
        }
    }

    /// Updates the gauges unless they were sampled within the last second. A source that fails or does not
    /// answer in time leaves its gauges as they were (its outage shows on `/health/ready`).
    pub async fn refresh(&self) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < MIN_SAMPLE_INTERVAL) {
            return;
        }
        let backlog = tokio::time::timeout(SAMPLE_TIMEOUT, db::backlog(&self.db));
        let depth = self.queue.depth(SAMPLE_TIMEOUT);
        let (backlog, depth) = tokio::join!(backlog, depth);
        if let Ok(Ok(backlog)) = backlog {
            metrics::gauge!("orders_pending").set(backlog.pending as f64);
            let age = backlog.oldest_pending.map_or(0.0, |oldest| {
                (chrono::Utc::now() - oldest).as_seconds_f64().max(0.0)
            });
            metrics::gauge!("orders_oldest_pending_age_seconds").set(age);
        }
        if let Ok(depth) = depth {
            record_depth(depth.waiting());
        }
        *last = Some(Instant::now());
    }
}

/// Records the jobs waiting in Redis (the reconciler does too, every round).
pub fn record_depth(waiting: u64) {
    metrics::gauge!("queue_jobs_waiting").set(waiting as f64);
}
