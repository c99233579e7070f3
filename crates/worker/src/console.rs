//! What this worker process tells the operations console: its card (see `orders_core::queue::console`), renewed
//! every few seconds with the jobs it is running and the orders it has completed, and deleted when it stops.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use chrono::{DateTime, Utc};
use orders_core::queue::{
    QueueKeys,
    console::{self, PUBLISH_INTERVAL, WorkerCard},
};
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

/// Jobs running now and orders completed, counted by the job handler. Cheap to share.
#[derive(Debug, Default)]
pub struct JobCounts {
    in_flight: AtomicU64,
    done: AtomicU64,
}

impl JobCounts {
    /// Counts a job as running until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> RunningJob {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RunningJob(self.clone())
    }

    /// Counts one order completed.
    pub fn completed(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Jobs running now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Orders completed so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// A job being run: counted in flight until dropped (also when its future is dropped midway).
#[derive(Debug)]
pub struct RunningJob(Arc<JobCounts>);

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Publishes this process's card every [`PUBLISH_INTERVAL`] until `stop`, then deletes it. A failed publication
/// is logged at debug level and tried again next time: the console is not worth a warning while Redis is away
/// (the queue's own warnings say so).
pub async fn publish_until_stopped(
    mut conn: ConnectionManager,
    keys: QueueKeys,
    name: String,
    counts: Arc<JobCounts>,
    stop: CancellationToken,
) {
    let started_at: DateTime<Utc> = Utc::now();
    let host = console::host_name();
    let mut every = tokio::time::interval(PUBLISH_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        let card = WorkerCard {
            id: name.clone(),
            host: host.clone(),
            started_at,
            last_heartbeat: Utc::now(),
            in_flight: counts.in_flight(),
            done: counts.done(),
        };
        let publication =
            tokio::time::timeout(PUBLISH_INTERVAL, console::publish(&mut conn, &keys, &card));
        match publication.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "cannot publish the worker's console card")
            }
            Err(_) => tracing::debug!("Redis did not take the worker's console card in time"),
        }
    }
    let retired = tokio::time::timeout(PUBLISH_INTERVAL, console::retire(&mut conn, &keys, &name));
    if !matches!(retired.await, Ok(Ok(()))) {
        tracing::debug!("cannot delete the worker's console card; it expires by itself");
    }
}
