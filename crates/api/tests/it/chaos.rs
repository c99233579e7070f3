//! Chaos: the api and a worker drain N orders while their Redis loses state: it evicts keys under a memory
//! limit, has keys and members deleted at random, is flushed, or fails over to a replica that lacks the last
//! writes. PostgreSQL is the source of truth, so no loss in Redis may lose or repeat a transition: each test
//! asserts from PostgreSQL that every order is COMPLETED and that its history holds exactly one PROCESSING and
//! exactly one COMPLETED row, within a deadline that grows with N, and prints how long the drain took after the
//! loss.
//!
//! Each test starts a redis-server of its own (it must be installed). N is `CHAOS_ORDERS` (default 2,000); the
//! big form, with the timings:
//!
//! ```text
//! CHAOS_ORDERS=20000 DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo test -p api --test it chaos -- --nocapture
//! ```

use std::{
    net::{Ipv4Addr, TcpListener},
    time::{Duration, Instant},
};

use clap::Parser;
use futures_util::{StreamExt, stream};
use orders_core::{
    config::QueueConfig,
    queue::{self, QueueKeys},
};
use redis::aio::MultiplexedConnection;
use reqwest::{Client, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use tokio::{sync::RwLock, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    helpers::{TestApp, test_config},
    own_redis::OwnRedis,
};

/// Orders created at once through the api.
const IN_FLIGHT: usize = 32;

/// Orders each test drains: `CHAOS_ORDERS`, 2,000 by default.
fn order_count() -> usize {
    std::env::var("CHAOS_ORDERS").map_or(2000, |n| {
        n.parse().expect("CHAOS_ORDERS is a number of orders")
    })
}

/// How long a test may take from the start of the drain to the last order COMPLETED: 60 s for 2,000 orders in a
/// debug build (where they drain in under 20 s, most often in under 5), and 30 ms per order beyond.
fn deadline(orders: usize) -> Duration {
    Duration::from_millis(30 * orders as u64).max(Duration::from_secs(60))
}

/// The worker's settings: no stage delay, and a reconciler, lease and heartbeat short enough that a lost job is
/// delivered again within about a second.
fn worker_settings() -> worker::WorkerSettings {
    let mut settings = worker::Config::parse_from(["worker"]).worker;
    settings.order_stage_delay_ms = 0;
    settings.worker_poll_interval_ms = 20;
    settings.worker_heartbeat_ms = 1000;
    settings.reconcile_interval_ms = 250;
    settings.reconcile_redeliver_after_ms = 1000;
    settings.order_lease_ms = 2000;
    settings.worker_shutdown_timeout_ms = 2000;
    settings
}

/// The queue `queue_name` on the Redis at `redis_url`, configured as the tests' apps configure theirs.
fn queue_config(redis_url: &str, queue_name: &str) -> QueueConfig {
    let mut config = test_config().queue;
    config.redis_url = redis_url.to_owned();
    config.queue_name = queue_name.to_owned();
    config
}

/// A queue name of its own.
fn new_queue_name() -> String {
    format!("chaos-{}", Uuid::now_v7())
}

/// The api on `queue`.
async fn spawn_api(db: &PgPool, queue: &QueueConfig) -> TestApp {
    let queue = queue.clone();
    TestApp::spawn_with(db.clone(), |config| config.queue = queue).await
}

/// A worker running in this process; dropping it stops it.
struct Worker {
    stop: CancellationToken,
    run: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Worker {
    fn spawn(db: &PgPool, queue: &QueueConfig) -> Self {
        let stop = CancellationToken::new();
        let run = tokio::spawn(worker::run(
            worker_settings(),
            queue.clone(),
            db.clone(),
            stop.clone(),
        ));
        Self {
            stop,
            run: Some(run),
        }
    }

    /// Stops it and waits until it has (at most its shutdown timeout after the jobs in flight).
    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(run) = self.run.take()
            && let Err(err) = run.await.expect("the worker does not panic")
        {
            eprintln!("the worker stopped with an error: {err:#}");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Creates orders through the api whose base URL `target` holds when each request is sent. Holding `target`
/// for writing pauses creation (once the requests in flight are answered) and lets a test move it to another
/// api.
struct Creator {
    client: Client,
    target: RwLock<String>,
    token: String,
}

impl Creator {
    /// Creates through `app`, as a new user of it.
    async fn new(app: &TestApp) -> Self {
        Self {
            client: app.client.clone(),
            target: RwLock::new(app.base.clone()),
            token: app.new_user().await.access,
        }
    }

    /// Creates `count` orders, [`IN_FLIGHT`] at a time; each must be answered 201.
    async fn create(&self, count: usize) {
        stream::iter(0..count)
            .map(|_| self.create_one())
            .buffer_unordered(IN_FLIGHT)
            .collect::<()>()
            .await;
    }

    async fn create_one(&self) {
        let base = self.target.read().await;
        let response = self
            .client
            .post(format!("{base}/orders/create"))
            .bearer_auth(&self.token)
            .json(&json!({"product_name": "Widget", "amount": 1}))
            .send()
            .await
            .expect("the api answers");
        let status = response.status();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            response.text().await.unwrap_or_default()
        );
    }
}

/// An order that breaks the invariant: (id, status, PROCESSING rows, COMPLETED rows in its history).
type Violation = (Uuid, String, i64, i64);

/// The orders that are not COMPLETED, or whose history does not hold exactly one PROCESSING and exactly one
/// COMPLETED row, by id.
async fn violations(db: &PgPool) -> Vec<Violation> {
    sqlx::query_as(
        "select o.id, o.status::text,
                count(h.id) filter (where h.status = 'PROCESSING'),
                count(h.id) filter (where h.status = 'COMPLETED')
         from orders o
         left join order_status_history h on h.order_id = o.id
         group by o.id
         having o.status <> 'COMPLETED'
             or count(h.id) filter (where h.status = 'PROCESSING') <> 1
             or count(h.id) filter (where h.status = 'COMPLETED') <> 1
         order by o.id",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

/// One drain: the orders in PostgreSQL, the queue they go through (for failure messages), and the deadline.
struct Drain<'a> {
    db: &'a PgPool,
    orders: usize,
    queue: QueueConfig,
    deadline: Instant,
}

impl<'a> Drain<'a> {
    /// A drain of `orders` orders that starts now.
    fn start(db: &'a PgPool, orders: usize, queue: &QueueConfig) -> Self {
        Self {
            db,
            orders,
            queue: queue.clone(),
            deadline: Instant::now() + deadline(orders),
        }
    }

    async fn completed(&self) -> usize {
        let count: i64 =
            sqlx::query_scalar("select count(*) from orders where status = 'COMPLETED'")
                .fetch_one(self.db)
                .await
                .unwrap();
        count as usize
    }

    /// Waits until a `share` of the orders are COMPLETED; fails with [`Drain::describe`] at the deadline.
    async fn wait_for_share(&self, share: f64) -> Result<(), String> {
        let count = (self.orders as f64 * share).ceil() as usize;
        while self.completed().await < count {
            if Instant::now() >= self.deadline {
                return Err(format!(
                    "{count} of {} orders were not COMPLETED in time\n{}",
                    self.orders,
                    self.describe().await
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits for every order to be COMPLETED, reports the drain time since `loss`, and asserts from PostgreSQL
    /// that each order went through PROCESSING and COMPLETED exactly once.
    async fn assert_completed_exactly_once(&self, scenario: &str, loss: Instant) {
        if let Err(failure) = self.wait_for_share(1.0).await {
            panic!("{failure}");
        }
        eprintln!(
            "chaos {scenario}: {} orders completed in {:.1} s after the loss",
            self.orders,
            loss.elapsed().as_secs_f64()
        );
        let total: i64 = sqlx::query_scalar("select count(*) from orders")
            .fetch_one(self.db)
            .await
            .unwrap();
        assert_eq!(total, self.orders as i64, "orders in the database");
        assert!(
            violations(self.db).await.is_empty(),
            "{}",
            self.describe().await
        );
    }

    /// The orders by status, the first that break the invariant, and what is left of the queue in Redis.
    async fn describe(&self) -> String {
        let by_status: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "select status::text, count(*), count(*) filter (where enqueued_at is null),
                    count(*) filter (where parked_at is not null)
             from orders group by status order by status",
        )
        .fetch_all(self.db)
        .await
        .unwrap();
        let by_status: Vec<String> = by_status
            .into_iter()
            .map(|(status, n, unqueued, parked)| {
                format!("{n} {status} ({unqueued} with no push on record, {parked} parked)")
            })
            .collect();
        let violations = violations(self.db).await;
        let first: Vec<String> = violations
            .iter()
            .take(10)
            .map(|(id, status, processing, completed)| {
                format!("  {id}: {status}, {processing} PROCESSING and {completed} COMPLETED rows")
            })
            .collect();
        format!(
            "orders: {}\n{} orders break the invariant; the first:\n{}\nRedis: {}",
            by_status.join(", "),
            violations.len(),
            first.join("\n"),
            redis_summary(&self.queue).await
        )
    }
}

async fn connect(redis_url: &str) -> MultiplexedConnection {
    redis::Client::open(redis_url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers")
}

/// One field of `INFO <section>`.
async fn info_field(redis: &mut MultiplexedConnection, section: &str, field: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(redis)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Redis's memory and evictions and the sizes of the queue's main keys, for a failure message.
async fn redis_summary(queue: &QueueConfig) -> String {
    let Ok(client) = redis::Client::open(queue.redis_url.as_str()) else {
        return "a bad URL".into();
    };
    let Ok(mut redis) = client.get_multiplexed_async_connection().await else {
        return "no answer".into();
    };
    let keys = QueueKeys::new(&queue::queue_settings(queue));
    let sizes: redis::RedisResult<(usize, usize, usize, usize, usize)> = redis::pipe()
        .llen(&keys.active)
        .zcard(&keys.scheduled)
        .hlen(&keys.data)
        .scard(&keys.done)
        .scard(&keys.dead)
        .query_async(&mut redis)
        .await;
    let all: usize = redis::cmd("DBSIZE")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    format!(
        "used_memory {}, evicted_keys {}, {all} keys; (active, scheduled, data, done, dead) sizes {sizes:?}",
        info_field(&mut redis, "memory", "used_memory_human").await,
        info_field(&mut redis, "stats", "evicted_keys").await,
    )
}

/// A random number below `bound` (which is more than 0).
fn random_below(bound: usize) -> usize {
    (Uuid::new_v4().as_u128() % bound as u128) as usize
}

/// What [`delete_at_random`] deleted so far.
#[derive(Debug, Default)]
struct Deleted {
    keys: usize,
    members: usize,
}

/// Deletes 1% (at least one) of the keys under the queue's prefix, then 1% (at least one) of the members of each
/// remaining list, set, sorted set and hash under it.
async fn delete_at_random(
    redis: &mut MultiplexedConnection,
    queue_name: &str,
    deleted: &mut Deleted,
) -> redis::RedisResult<()> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{queue_name}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    for _ in 0..(keys.len() / 100).max(1) {
        if keys.is_empty() {
            return Ok(());
        }
        let key = keys.swap_remove(random_below(keys.len()));
        let removed: usize = redis::cmd("DEL").arg(&key).query_async(redis).await?;
        deleted.keys += removed;
    }
    if keys.is_empty() {
        return Ok(());
    }

    let mut types = redis::pipe();
    for key in &keys {
        types.cmd("TYPE").arg(key);
    }
    let types: Vec<String> = types.query_async(redis).await?;
    let mut sizes = redis::pipe();
    for (key, kind) in keys.iter().zip(&types) {
        let size = match kind.as_str() {
            "list" => "LLEN",
            "set" => "SCARD",
            "zset" => "ZCARD",
            "hash" => "HLEN",
            // A string has no members (and EXISTS is a harmless stand-in that keeps the replies in step).
            _ => "EXISTS",
        };
        sizes.cmd(size).arg(key);
    }
    let sizes: Vec<usize> = sizes.query_async(redis).await?;

    // Pick the members, then remove them: one removed in between, or a list entry that moved, removes nothing.
    let mut picks = redis::pipe();
    let mut picked = Vec::new();
    for ((key, kind), &size) in keys.iter().zip(&types).zip(&sizes) {
        if size == 0 {
            continue;
        }
        let count = (size / 100).max(1);
        match kind.as_str() {
            "list" => {
                for _ in 0..count {
                    picks.cmd("LINDEX").arg(key).arg(random_below(size));
                    picked.push((key, "LREM"));
                }
            }
            "set" => {
                picks.cmd("SRANDMEMBER").arg(key).arg(count);
                picked.push((key, "SREM"));
            }
            "zset" => {
                picks.cmd("ZRANDMEMBER").arg(key).arg(count);
                picked.push((key, "ZREM"));
            }
            "hash" => {
                picks.cmd("HRANDFIELD").arg(key).arg(count);
                picked.push((key, "HDEL"));
            }
            _ => {}
        }
    }
    if picked.is_empty() {
        return Ok(());
    }
    let members: Vec<redis::Value> = picks.query_async(redis).await?;
    let mut removals = redis::pipe();
    for ((key, remove), members) in picked.into_iter().zip(members) {
        let members: Vec<Vec<u8>> = match members {
            redis::Value::Nil => continue,
            redis::Value::BulkString(member) => vec![member],
            members => redis::from_redis_value(members)?,
        };
        if members.is_empty() {
            continue;
        }
        if remove == "LREM" {
            for member in members {
                removals.cmd("LREM").arg(key).arg(1).arg(member);
            }
        } else {
            removals.cmd(remove).arg(key).arg(members);
        }
    }
    let removed: Vec<usize> = removals.query_async(redis).await?;
    deleted.members += removed.iter().sum::<usize>();
    Ok(())
}

/// With Redis capped at 2 MB and evicting any key (`allkeys-lru`) for the whole drain, queue keys go while jobs
/// wait, run and are acknowledged.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_complete_exactly_once_while_redis_evicts_queue_keys(db: PgPool) {
    let orders = order_count();
    let mut redis =
        OwnRedis::with_args(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    redis.start().await;
    let queue = queue_config(&redis.url(), &new_queue_name());
    let app = spawn_api(&db, &queue).await;
    let creator = Creator::new(&app).await;
    // Half the orders wait in Redis when the worker starts; the other half are created as it drains.
    creator.create(orders / 2).await;
    let drain = Drain::start(&db, orders, &queue);
    let loss = Instant::now();
    let worker = Worker::spawn(&db, &queue);
    let ((), drained) = tokio::join!(
        creator.create(orders - orders / 2),
        drain.wait_for_share(1.0)
    );
    let mut conn = connect(&redis.url()).await;
    let evicted = info_field(&mut conn, "stats", "evicted_keys").await;
    let refused = info_field(&mut conn, "errorstats", "errorstat_OOM").await;
    let refused = refused.strip_prefix("count=").unwrap_or("0");
    eprintln!(
        "chaos eviction: Redis evicted {evicted} keys and refused {refused} commands for want of memory"
    );
    if let Err(failure) = drained {
        panic!("{failure}");
    }
    drain.assert_completed_exactly_once("eviction", loss).await;
    assert_ne!(
        evicted, "0",
        "Redis evicted nothing: the test proved nothing"
    );
    worker.stop().await;
}

/// Every second, 1% of the queue's keys are deleted, and 1% of the members of each of its lists, sets, sorted sets
/// and hashes (at least one of each): jobs, their data and metadata, in-flight records and worker registrations
/// go missing at random until every order is COMPLETED.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_complete_exactly_once_while_queue_keys_and_members_are_deleted_at_random(
    db: PgPool,
) {
    let orders = order_count();
    let mut redis = OwnRedis::new();
    redis.start().await;
    let queue = queue_config(&redis.url(), &new_queue_name());
    let app = spawn_api(&db, &queue).await;
    let creator = Creator::new(&app).await;
    creator.create(orders / 2).await;
    let drain = Drain::start(&db, orders, &queue);
    let loss = Instant::now();
    let worker = Worker::spawn(&db, &queue);
    let mut conn = connect(&redis.url()).await;
    let mut deleted = Deleted::default();
    let chaos = async {
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        loop {
            every_second.tick().await;
            if let Err(err) = delete_at_random(&mut conn, &queue.queue_name, &mut deleted).await {
                eprintln!("chaos random deletion: a round failed: {err}");
            }
        }
    };
    let ((), drained) = tokio::join!(creator.create(orders - orders / 2), async {
        tokio::select! {
            drained = drain.wait_for_share(1.0) => drained,
            () = chaos => unreachable!("the chaos goes on until it is dropped"),
        }
    });
    eprintln!(
        "chaos random deletion: deleted {} keys and {} members",
        deleted.keys, deleted.members
    );
    if let Err(failure) = drained {
        panic!("{failure}");
    }
    drain
        .assert_completed_exactly_once("random deletion", loss)
        .await;
    worker.stop().await;
}

/// Redis is flushed once, with about a third of the orders COMPLETED: every job waiting or running is gone, and
/// so are the worker's registration and the jobs it holds.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_complete_exactly_once_after_redis_is_flushed_mid_drain(db: PgPool) {
    let orders = order_count();
    let mut redis = OwnRedis::new();
    redis.start().await;
    let queue = queue_config(&redis.url(), &new_queue_name());
    let app = spawn_api(&db, &queue).await;
    let creator = Creator::new(&app).await;
    creator.create(orders / 2).await;
    let drain = Drain::start(&db, orders, &queue);
    let worker = Worker::spawn(&db, &queue);
    let mut conn = connect(&redis.url()).await;
    tokio::join!(creator.create(orders - orders / 2), async {
        if let Err(failure) = drain.wait_for_share(0.3).await {
            panic!("{failure}");
        }
        let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
        let loss = Instant::now();
        eprintln!(
            "chaos FLUSHALL: flushed with {} of {orders} orders COMPLETED",
            drain.completed().await
        );
        drain.assert_completed_exactly_once("FLUSHALL", loss).await;
    });
    worker.stop().await;
}

/// A port no one listens on now; another process may take it before redis-server binds it.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Starts a redis-server that a replica can follow: it also listens on a free TCP port of 127.0.0.1 (the
/// second). It sends a replica its data over the socket (nothing written to disk), at once.
async fn start_primary() -> (OwnRedis, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut primary = OwnRedis::with_args(&[
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]);
        match primary.try_start().await {
            Ok(()) => return (primary, port),
            // Taken since it was found free: redis-server exits.
            Err(err) => eprintln!("{err}; trying another port"),
        }
    }
    panic!("redis-server found no free port in 5 tries");
}

/// A primary and its replica in sync; with about a third of the orders COMPLETED the replica is cut off while
/// the api and the worker go on writing to the primary for a second (or until 60% are COMPLETED, if sooner), then
/// the primary dies and a new api and worker start on the replica, which lacks those writes: jobs pushed, fetched
/// and acknowledged on the primary only.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_complete_exactly_once_after_failing_over_to_a_replica_that_lacks_the_last_writes(
    db: PgPool,
) {
    let orders = order_count();
    let (mut primary, port) = start_primary().await;
    let mut replica = OwnRedis::with_args(&[
        "--replicaof",
        "127.0.0.1",
        &port.to_string(),
        // Loads the primary's data straight from the socket (nothing written to disk).
        "--repl-diskless-load",
        "on-empty-db",
    ]);
    replica.start().await;
    let mut on_replica = connect(&replica.url()).await;
    let syncing = Instant::now();
    while info_field(&mut on_replica, "replication", "master_link_status").await != "up" {
        assert!(
            syncing.elapsed() < Duration::from_secs(10),
            "the replica did not sync within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let queue = queue_config(&primary.url(), &new_queue_name());
    let mut app = spawn_api(&db, &queue).await;
    let creator = Creator::new(&app).await;
    creator.create(orders / 2).await;
    let drain = Drain::start(&db, orders, &queue);
    let worker = Worker::spawn(&db, &queue);
    let on_the_replica = queue_config(&replica.url(), &queue.queue_name);
    let ((), (_api, worker)) = tokio::join!(creator.create(orders - orders / 2), async {
        if let Err(failure) = drain.wait_for_share(0.3).await {
            panic!("{failure}");
        }
        let () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut on_replica)
            .await
            .unwrap();
        let loss = Instant::now();
        let at_cut = drain.completed().await;
        // A second of writes the replica misses, or less if the drain would be nearly over by then: a debug
        // build drains 2,000 orders in about two seconds.
        let _ = tokio::time::timeout(Duration::from_secs(1), drain.wait_for_share(0.6)).await;
        // Creation pauses while the system moves to the replica (the requests in flight are answered first).
        let mut target = creator.target.write().await;
        eprintln!(
            "chaos failover: replica cut off with {at_cut} of {orders} orders COMPLETED; primary stopped {:.1} s later with {}",
            loss.elapsed().as_secs_f64(),
            drain.completed().await
        );
        primary.stop();
        app.begin_stop();
        let _ = (&mut app.server).await;
        worker.stop().await;
        let api = spawn_api(&db, &on_the_replica).await;
        let worker = Worker::spawn(&db, &on_the_replica);
        *target = api.base.clone();
        drop(target);
        let drain = Drain {
            queue: on_the_replica.clone(),
            ..drain
        };
        drain.assert_completed_exactly_once("failover", loss).await;
        (api, worker)
    });
    worker.stop().await;
}
