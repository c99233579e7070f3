//! The reconciler: PostgreSQL is the truth and Redis only carries wake-ups, so anything a lost job would
//! leave behind is found here and queued again. It runs in every worker process; `FOR UPDATE SKIP LOCKED` plus
//! marking orders as just enqueued keeps several reconcilers from pushing the same order in one round, and a
//! duplicate push would be harmless anyway (the handler's updates are conditional).

use std::time::Duration;

use orders_core::{
    db::orders as db,
    queue::{self, OrderQueue},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerSettings;

/// Most orders pushed in one round.
const BATCH: i64 = 500;

/// Finds overdue orders and pushes their jobs again.
#[derive(Clone)]
pub struct Reconciler {
    db: PgPool,
    queue: OrderQueue,
    redeliver_after: Duration,
    push_timeout: Duration,
}

impl Reconciler {
    /// A reconciler over `db` pushing to `queue`.
    pub fn new(
        db: PgPool,
        queue: OrderQueue,
        settings: &WorkerSettings,
        push_timeout: Duration,
    ) -> Self {
        Self {
            db,
            queue,
            redeliver_after: settings.redeliver_after(),
            push_timeout,
        }
    }

    /// One round; returns how many orders were pushed. Skips the round while Redis is unreachable, so orders
    /// are not marked as enqueued when they cannot be.
    pub async fn run_once(&self) -> anyhow::Result<usize> {
        let Some(idle) = self.queue_is_idle().await else {
            tracing::warn!("reconciler: Redis unreachable, skipping this round");
            return Ok(0);
        };
        let due = db::take_due_for_enqueue(&self.db, idle, self.redeliver_after, BATCH).await?;
        let mut pushed = 0;
        let mut failed = false;
        for order_id in due {
            if !failed {
                match queue::enqueue(&self.queue, order_id, self.push_timeout).await {
                    Ok(()) => {
                        pushed += 1;
                        metrics::counter!("worker_reconciler_requeued_total").increment(1);
                        tracing::info!(%order_id, "reconciler: job queued again");
                        continue;
                    }
                    Err(err) => {
                        tracing::warn!(%order_id, error = %err, "reconciler: push failed; will retry next round");
                        failed = true;
                    }
                }
            }
            db::clear_enqueued(&self.db, order_id).await?;
        }
        Ok(pushed)
    }

    /// Whether the queue holds no waiting job (`None`: Redis did not answer).
    async fn queue_is_idle(&self) -> Option<bool> {
        let config = self.queue.get_config();
        let mut conn = self.queue.clone().get_connection().clone();
        let mut pipe = redis::pipe();
        pipe.cmd("LLEN")
            .arg(config.active_jobs_list())
            .cmd("ZCARD")
            .arg(config.scheduled_jobs_set());
        let waiting = pipe.query_async::<(u64, u64)>(&mut conn);
        match tokio::time::timeout(self.push_timeout, waiting).await {
            Ok(Ok((active, scheduled))) => {
                metrics::gauge!("worker_queue_depth").set((active + scheduled) as f64);
                Some(active + scheduled == 0)
            }
            _ => None,
        }
    }

    /// Runs a round every `interval` until `stop` is cancelled.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.run_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pushed = n, "reconciler: queued overdue orders"),
                Err(err) => {
                    tracing::warn!(error = %err, "reconciler round failed; retrying next round")
                }
            }
        }
    }
}
