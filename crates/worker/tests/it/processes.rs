//! The `worker` binary as ops run it: killed with SIGKILL, stopped with SIGTERM.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orders_core::domain::OrderStatus;
use sqlx::PgPool;

use crate::helpers::{
    TestQueue, create_and_enqueue, fast_settings, spawn_worker, status_of, wait_until,
};

/// The URL of the test's own database, for a spawned process.
fn database_url(db: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for #[sqlx::test]");
    let name = db
        .connect_options()
        .get_database()
        .expect("database name")
        .to_owned();
    let (server, _) = base.rsplit_once('/').expect("URL has a path");
    format!("{server}/{name}")
}

fn spawn_binary(db: &PgPool, queue: &TestQueue, stage_delay_ms: u64, lease_ms: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .env("DATABASE_URL", database_url(db))
        .env("REDIS_URL", &queue.config.redis_url)
        .env("QUEUE_NAME", &queue.config.queue_name)
        .env("ORDER_STAGE_DELAY_MS", stage_delay_ms.to_string())
        .env("ORDER_LEASE_MS", lease_ms.to_string())
        .env("WORKER_HEARTBEAT_MS", "500")
        .env("RECONCILE_INTERVAL_MS", "500")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("worker binary")
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_order_held_by_a_killed_worker_is_completed_by_another(db: PgPool) {
    let queue = TestQueue::new();
    let mut doomed = spawn_binary(&db, &queue, 1000, 3000);
    let [id] = create_and_enqueue(&db, &queue.push_queue(), 1).await[..] else {
        unreachable!()
    };
    wait_until(
        Duration::from_secs(20),
        "the order to be PROCESSING",
        || async { status_of(&db, id).await == OrderStatus::Processing },
    )
    .await;
    doomed.kill().expect("SIGKILL");
    doomed.wait().expect("reaped");
    let killed_at = Instant::now();

    let mut settings = fast_settings();
    settings.order_lease_ms = 3000;
    let (stop, survivor) = spawn_worker(&db, &queue.config, settings);
    wait_until(
        Duration::from_secs(20),
        "the order to be COMPLETED",
        || async { status_of(&db, id).await == OrderStatus::Completed },
    )
    .await;
    // The README's bound: lease + reconcile interval + pickup + the remaining stages.
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "took {:?}",
        killed_at.elapsed()
    );
    stop.cancel();
    survivor.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn sigterm_lets_the_job_in_flight_finish_and_exits_0(db: PgPool) {
    let queue = TestQueue::new();
    let mut worker = spawn_binary(&db, &queue, 1500, 5000);
    let [id] = create_and_enqueue(&db, &queue.push_queue(), 1).await[..] else {
        unreachable!()
    };
    wait_until(
        Duration::from_secs(20),
        "the order to be PROCESSING",
        || async { status_of(&db, id).await == OrderStatus::Processing },
    )
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = worker.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "worker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
    assert_eq!(status_of(&db, id).await, OrderStatus::Completed);
}
