//! The reconciler: PostgreSQL is the queue of record and Redis only carries wake-ups, so the reconciler feeds
//! Redis from PostgreSQL. It runs in every worker process and does three things:
//! - **feeds the backlog**: orders that found the queue full (`QUEUE_MAX_JOBS`) wait in PostgreSQL; they are
//!   pushed oldest first as the queue drains, in batches, and while a backlog lasts the api leaves new orders
//!   to it too, so that they take their turn;
//! - **re-pushes by age**: a `PENDING` order pushed longer than `RECONCILE_REDELIVER_AFTER_MS` ago is pushed
//!   again (its job may be lost: Redis wiped, or dead after its retries; a duplicate is harmless), and so is a
//!   `PROCESSING` order whose lease expired;
//! - **sweeps Redis** (see [`crate::janitor`]).
//!
//! One reconciler feeds at a time (a lock in Redis), so several workers never fill the same room twice and the
//! bound holds; `FOR UPDATE SKIP LOCKED` plus marking orders as just enqueued would keep them from pushing the same
//! order anyway, and a duplicate push is harmless (the handler's updates are conditional).

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use crate::outage::RedisOutage;
use orders_core::{
    db::orders as db,
    domain::OrderId,
    queue::{OrderQueue, gauges},
};
use redis::Script;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{config::WorkerSettings, janitor::Janitor};

/// Most orders pushed in one round trip (and taken in one query).
const BATCH: u64 = 1000;
/// Fewest orders one push carries after Redis refused larger ones.
const MIN_BATCH: u64 = 10;
/// While a backlog waits in PostgreSQL, how often the reconciler looks for room in Redis.
const FEED_INTERVAL: Duration = Duration::from_millis(100);
/// How often, at least, finished jobs are forgotten: Redis holds at most this long's worth of them.
const PURGE_INTERVAL: Duration = Duration::from_secs(1);
/// How long the feed lock outlives a reconciler that died holding it. A round takes milliseconds.
const FEED_LOCK_TTL: Duration = Duration::from_secs(10);

/// Deletes the feed lock only if its holder is the caller.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(r#"if redis.call("get", KEYS[1]) == ARGV[1] then redis.call("del", KEYS[1]) end"#)
});

/// Feeds and re-feeds the queue from PostgreSQL, and sweeps Redis.
pub struct Reconciler {
    /// This worker process's name: the feed lock's value.
    name: String,
    db: PgPool,
    queue: OrderQueue,
    janitor: Janitor,
    redeliver_after: Duration,
    push_timeout: Duration,
    /// Whether the last round that could tell left orders waiting for room.
    backlog: bool,
    /// How long the backlog flag lives unless a round renews it (so it dies with the last worker).
    backlog_ttl: Duration,
    /// Logs a Redis outage once.
    outage: RedisOutage,
    /// Orders one push carries now: halved each time Redis refuses a push (a Redis out of memory refuses a large
    /// script that a small one would fit), doubled back after each push it takes, up to [`BATCH`].
    push_batch: u64,
}

impl Reconciler {
    /// A reconciler over `db` pushing to `queue`, reporting Redis failures through `outage`.
    pub fn new(
        name: String,
        db: PgPool,
        queue: OrderQueue,
        janitor: Janitor,
        settings: &WorkerSettings,
        push_timeout: Duration,
        outage: RedisOutage,
    ) -> Self {
        Self {
            name,
            outage,
            db,
            queue,
            janitor,
            redeliver_after: settings.redeliver_after(),
            push_timeout,
            backlog: false,
            push_batch: BATCH,
            backlog_ttl: (settings.reconcile_interval() * 3).max(Duration::from_secs(1)),
        }
    }

    /// A full round: sweeps Redis, then pushes every due order there is room for. Returns how many were pushed.
    async fn full_round(&mut self) -> anyhow::Result<usize> {
        match self.janitor.sweep().await {
            Ok(sweep) => {
                self.outage.succeeded();
                tracing::debug!(?sweep, "janitor: swept");
            }
            Err(err) => self.outage.redis_failed("the janitor's sweep", &err),
        }
        self.feed(1).await
    }

    /// Pushes due orders, oldest first, while Redis has room, if it has at least `min_room`: one reconciler at
    /// a time (the others skip the round), so that together they never fill the same room twice.
    async fn feed(&mut self, min_room: u64) -> anyhow::Result<usize> {
        match self.lock_feed().await {
            Ok(true) => {}
            Ok(false) => return Ok(0),
            Err(err) => {
                self.outage.redis_failed("the reconciler's feed lock", &err);
                return Ok(0);
            }
        }
        let fed = self.feed_locked(min_room).await;
        if let Err(err) = self.unlock_feed().await {
            tracing::warn!(error = %err, "reconciler: cannot release the feed lock; it expires by itself");
        }
        fed
    }

    /// Takes the feed lock for [`FEED_LOCK_TTL`] unless another reconciler holds it.
    async fn lock_feed(&self) -> redis::RedisResult<bool> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(&self.queue.keys().feed_lock)
            .arg(&self.name)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(FEED_LOCK_TTL.as_millis()).unwrap_or(u64::MAX))
            .query_async(&mut self.queue.connection())
            .await?;
        Ok(taken.is_some())
    }

    /// Releases the feed lock if this reconciler still holds it.
    async fn unlock_feed(&self) -> redis::RedisResult<()> {
        UNLOCK
            .key(&self.queue.keys().feed_lock)
            .arg(&self.name)
            .invoke_async(&mut self.queue.connection())
            .await
    }

    /// [`Self::feed`] under the lock. Skips the round while Redis is unreachable, so that orders are not marked
    /// as enqueued when they cannot be.
    async fn feed_locked(&mut self, min_room: u64) -> anyhow::Result<usize> {
        let depth = match self.queue.depth(self.push_timeout).await {
            Ok(depth) => depth,
            Err(err) => {
                self.outage.failed("the reconciler's depth reading", &err);
                return Ok(0);
            }
        };
        gauges::record_depth(depth.waiting());
        let mut room = self.queue.max_jobs().saturating_sub(depth.waiting());
        if room == 0 || room < min_room {
            // Nothing is taken, so nothing new is learnt about the backlog: keep its flag alive.
            self.publish_backlog().await;
            return Ok(0);
        }
        let mut pushed = 0;
        loop {
            let want = room.min(self.push_batch);
            let due = db::take_due_for_enqueue(
                &self.db,
                self.redeliver_after,
                i64::try_from(want).unwrap_or(i64::MAX),
            )
            .await?;
            let ids: Vec<OrderId> = due.iter().map(|order| order.id).collect();
            if let Err(err) = self.queue.push_orders(&ids, self.push_timeout).await {
                tracing::warn!(orders = ids.len(), error = %err, "reconciler: push failed; will retry next round");
                db::clear_enqueued(&self.db, &ids).await?;
                self.push_batch = (self.push_batch / 2).max(MIN_BATCH);
                return Ok(pushed);
            }
            self.push_batch = (self.push_batch * 2).min(BATCH);
            pushed += ids.len();
            metrics::counter!("worker_reconciler_requeued_total").increment(ids.len() as u64);
            room -= ids.len() as u64;
            if (ids.len() as u64) < want {
                self.backlog = false;
                break;
            }
            if room == 0 {
                self.backlog = true;
                break;
            }
        }
        self.publish_backlog().await;
        Ok(pushed)
    }

    /// Tells the api whether to leave new orders to the reconciler.
    async fn publish_backlog(&self) {
        let mut conn = self.queue.connection();
        let key = &self.queue.keys().backlog;
        let result = if self.backlog {
            let ttl = u64::try_from(self.backlog_ttl.as_millis()).unwrap_or(u64::MAX);
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut conn)
                .await
        } else {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<()>(&mut conn)
                .await
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "reconciler: cannot update the backlog flag");
        }
    }

    /// Runs a full round every `interval`; in between, forgets finished jobs and heals what Redis lost (see
    /// [`Janitor::heal`]) every second, and while a backlog
    /// waits, feeds it every 100 ms as soon as half the queue has drained (large batches, few queries), until
    /// `stop` is cancelled.
    pub async fn run(mut self, interval: Duration, stop: CancellationToken) {
        let low_water = (self.queue.max_jobs() / 2).max(1);
        let mut next_full = Instant::now();
        loop {
            let tick = if self.backlog {
                FEED_INTERVAL
            } else {
                PURGE_INTERVAL
            };
            let wait = tick.min(next_full.saturating_duration_since(Instant::now()));
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            let full = Instant::now() >= next_full;
            let round = if full {
                next_full = Instant::now() + interval;
                self.full_round().await
            } else {
                match self.janitor.purge_finished().await {
                    Ok(_) => self.outage.succeeded(),
                    Err(err) => self.outage.redis_failed("the janitor's purge", &err),
                }
                if let Err(err) = self.janitor.heal().await {
                    self.outage.redis_failed("the janitor's heal", &err);
                }
                if self.backlog {
                    self.feed(low_water).await
                } else {
                    Ok(0)
                }
            };
            match round {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    pushed = n,
                    backlog = self.backlog,
                    "reconciler: queued orders"
                ),
                Err(err) => {
                    tracing::warn!(error = %err, "reconciler round failed; retrying next round")
                }
            }
        }
    }
}
