//! Real workers in this process, a real Redis queue, real faults.

use std::{collections::HashSet, time::Duration};

use sqlx::PgPool;

use crate::{
    helpers::{
        TestQueue, count_with_status, create_and_enqueue, fast_settings, new_orders, spawn_worker,
        transitions, wait_until,
    },
    own_redis::OwnRedis,
};

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn two_workers_move_every_order_through_each_transition_exactly_once(db: PgPool) {
    let queue = TestQueue::new();
    let ids = create_and_enqueue(&db, &queue.push_queue(), 200).await;
    assert_eq!(ids.len(), 200);
    let (stop_a, a) = spawn_worker(&db, &queue.config, fast_settings());
    let (stop_b, b) = spawn_worker(&db, &queue.config, fast_settings());
    wait_until(Duration::from_secs(60), "200 completed orders", || async {
        count_with_status(&db, "COMPLETED").await == 200
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
    a.await.unwrap();
    b.await.unwrap();
    for status in ["PROCESSING", "COMPLETED"] {
        let counts = transitions(&db, status).await;
        assert_eq!(counts.len(), 200);
        assert!(
            counts.iter().all(|(_, n)| *n == 1),
            "an order entered {status} other than once: {counts:?}"
        );
    }
    let workers: HashSet<String> =
        sqlx::query_scalar("select split_part(changed_by, '/', 1) from order_status_history")
            .fetch_all(&db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(workers.len(), 2, "both workers took part: {workers:?}");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_whose_jobs_were_wiped_from_redis_complete_through_the_reconciler(db: PgPool) {
    let queue = TestQueue::new();
    create_and_enqueue(&db, &queue.push_queue(), 20).await;
    queue.wipe();
    let (stop, worker) = spawn_worker(&db, &queue.config, fast_settings());
    wait_until(Duration::from_secs(30), "20 completed orders", || async {
        count_with_status(&db, "COMPLETED").await == 20
    })
    .await;
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_never_enqueued_are_found_by_the_reconciler(db: PgPool) {
    let queue = TestQueue::new();
    new_orders(&db, 5).await;
    let (stop, worker) = spawn_worker(&db, &queue.config, fast_settings());
    wait_until(Duration::from_secs(30), "5 completed orders", || async {
        count_with_status(&db, "COMPLETED").await == 5
    })
    .await;
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_created_while_redis_is_down_complete_once_it_is_back(db: PgPool) {
    let mut redis = OwnRedis::new();
    redis.start().await;
    let queue = TestQueue::at(&redis.url());
    let (stop, worker) = spawn_worker(&db, &queue.config, fast_settings());
    // The worker is up and consuming; then Redis goes away and orders keep coming.
    create_and_enqueue(&db, &queue.push_queue(), 3).await;
    wait_until(
        Duration::from_secs(30),
        "first orders completed",
        || async { count_with_status(&db, "COMPLETED").await == 3 },
    )
    .await;
    redis.stop();
    let ids = create_and_enqueue(&db, &queue.push_queue(), 10).await;
    assert_eq!(ids.len(), 10);
    let not_enqueued: i64 =
        sqlx::query_scalar("select count(*) from orders where enqueued_at is null")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(not_enqueued, 10, "pushes to a stopped Redis must fail");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count_with_status(&db, "PENDING").await, 10);

    // Redis comes back (empty: it keeps nothing on disk). Nothing is restarted.
    redis.start().await;
    wait_until(
        Duration::from_secs(40),
        "all 13 orders completed",
        || async { count_with_status(&db, "COMPLETED").await == 13 },
    )
    .await;
    stop.cancel();
    worker.await.unwrap();
}
