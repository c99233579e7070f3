use std::{
    future::Future,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use orders_core::{
    config::QueueConfig,
    db::{orders as db, users},
    domain::{Amount, Email, OrderId, OrderStatus, ProductName, UserId, UserName},
    queue::{self, Admission, EnqueueError, OrderQueue, QueueKeys},
};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::WorkerSettings;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A queue of its own for one test; its keys are deleted when dropped.
pub struct TestQueue {
    pub config: QueueConfig,
}

impl TestQueue {
    pub fn new() -> Self {
        Self::at(&redis_url())
    }

    pub fn at(redis_url: &str) -> Self {
        let mut config = worker::Config::parse_from(["worker"]).queue;
        config.redis_url = redis_url.to_owned();
        config.queue_name = format!("test-{}", Uuid::now_v7());
        Self { config }
    }

    pub fn push_queue(&self) -> OrderQueue {
        queue::order_queue(&self.config).expect("queue")
    }

    /// A connection for looking at (and tampering with) this queue's keys.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.config.redis_url.as_str())
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis answers")
    }

    /// The layout of this queue's keys.
    pub fn keys(&self) -> QueueKeys {
        QueueKeys::new(&queue::queue_settings(&self.config))
    }

    /// Every key of this queue that exists now, sorted (KEYS is fine on a test's own small keyspace).
    pub async fn existing_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.config.queue_name))
            .query_async(&mut self.redis().await)
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// Registered workers (apalis's workers set).
    pub async fn registered_workers(&self) -> Vec<String> {
        redis::cmd("ZRANGE")
            .arg(self.keys().workers)
            .arg(0)
            .arg(-1)
            .query_async(&mut self.redis().await)
            .await
            .unwrap()
    }

    /// Workers' metadata hashes that exist.
    pub async fn worker_metadata_keys(&self) -> Vec<String> {
        let prefix = format!("{}:", self.keys().worker_metadata);
        self.existing_keys()
            .await
            .into_iter()
            .filter(|key| key.starts_with(&prefix))
            .collect()
    }

    /// Deletes every key of this queue, as if Redis had been wiped.
    pub fn wipe(&self) {
        let Ok(client) = redis::Client::open(self.config.redis_url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.config.queue_name))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// Fast settings for tests: short stages, lease and reconciler rounds.
pub fn fast_settings() -> WorkerSettings {
    let mut settings = worker::Config::parse_from(["worker"]).worker;
    settings.order_stage_delay_ms = 10;
    settings.order_lease_ms = 2_000;
    settings.worker_poll_interval_ms = 20;
    settings.worker_heartbeat_ms = 1000;
    settings.reconcile_interval_ms = 200;
    settings.reconcile_redeliver_after_ms = 500;
    settings.worker_shutdown_timeout_ms = 5_000;
    settings
}

/// A worker running in this process until the returned token is cancelled.
pub fn spawn_worker(
    db: &PgPool,
    queue: &QueueConfig,
    settings: WorkerSettings,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let run = worker::run(settings, queue.clone(), db.clone(), stop.clone());
    let handle = tokio::spawn(async move { run.await.expect("worker runs") });
    (stop, handle)
}

pub async fn new_user(db: &PgPool) -> UserId {
    let email = Email::parse(&format!("{}@example.com", Uuid::new_v4())).unwrap();
    users::insert_user(
        db,
        &UserName::parse("Test").unwrap(),
        &email,
        "not-a-real-hash",
    )
    .await
    .unwrap()
    .id
}

/// Creates `n` PENDING orders for a new user, without queueing them.
pub async fn new_orders(db: &PgPool, n: usize) -> Vec<OrderId> {
    let user = new_user(db).await;
    let name = ProductName::parse("Widget").unwrap();
    let amount = Amount::parse(Decimal::new(1999, 2)).unwrap();
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let order = db::insert_order(
            db,
            &db::NewOrder::new(user, name.clone(), amount, None, false),
        )
        .await
        .unwrap()
        .unwrap();
        ids.push(order.id);
    }
    ids
}

/// Creates orders the way the api does: insert, then push if the queue has room (recording the push if it
/// happened).
pub async fn create_and_enqueue(db: &PgPool, queue: &OrderQueue, n: usize) -> Vec<OrderId> {
    let ids = new_orders(db, n).await;
    for id in &ids {
        let _ = push_like_the_api(db, queue, *id).await;
    }
    ids
}

/// What the api does with a just-created order: the same call, the same bookkeeping (a failed push is left
/// to the reconciler).
pub async fn push_like_the_api(
    db: &PgPool,
    queue: &OrderQueue,
    id: OrderId,
) -> Result<Admission, EnqueueError> {
    let timeout = Duration::from_millis(500);
    let admission = queue.admit(timeout).await?;
    if admission == Admission::Pushed {
        queue.push(id, timeout).await?;
        sqlx::query("update orders set enqueued_at = now() where id = $1")
            .bind(id.0)
            .execute(db)
            .await
            .unwrap();
    }
    Ok(admission)
}

pub async fn status_of(db: &PgPool, id: OrderId) -> OrderStatus {
    db::order_status(db, id)
        .await
        .unwrap()
        .expect("order exists")
}

pub async fn count_with_status(db: &PgPool, status: &str) -> i64 {
    sqlx::query_scalar("select count(*) from orders where status = $1::order_status")
        .bind(status)
        .fetch_one(db)
        .await
        .unwrap()
}

/// Waits until `condition` holds, polling; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    started.elapsed()
}

/// How many times each order entered `status`, by order.
pub async fn transitions(db: &PgPool, status: &str) -> Vec<(Uuid, i64)> {
    sqlx::query_as(
        "select o.id, count(h.id) from orders o
         left join order_status_history h on h.order_id = o.id and h.status = $1::order_status
         group by o.id",
    )
    .bind(status)
    .fetch_all(db)
    .await
    .unwrap()
}

/// The URL of the test's own database, for a spawned process.
pub fn database_url(db: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for #[sqlx::test]");
    let name = db
        .connect_options()
        .get_database()
        .expect("database name")
        .to_owned();
    let (server, _) = base.rsplit_once('/').expect("URL has a path");
    format!("{server}/{name}")
}

/// The `worker` binary on the test's database and queue, as ops run it.
pub fn spawn_binary(db: &PgPool, queue: &TestQueue, stage_delay_ms: u64, lease_ms: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .env("DATABASE_URL", database_url(db))
        .env("REDIS_URL", &queue.config.redis_url)
        .env("QUEUE_NAME", &queue.config.queue_name)
        .env("ORDER_STAGE_DELAY_MS", stage_delay_ms.to_string())
        .env("ORDER_LEASE_MS", lease_ms.to_string())
        .env("WORKER_HEARTBEAT_MS", "1000")
        .env("RECONCILE_INTERVAL_MS", "500")
        .env("WORKER_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("worker binary")
}
