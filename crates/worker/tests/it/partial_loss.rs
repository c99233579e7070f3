//! Redis losing part of the queue's state (eviction, a key deleted by hand, a failover to a replica that lagged):
//! apalis-redis cannot fetch past an entry it cannot read, so the worker repairs or removes each one and
//! PostgreSQL re-drives the orders whose jobs were lost.

use std::time::Duration;

use redis::AsyncCommands;
use sqlx::PgPool;

use crate::helpers::{
    TestQueue, count_with_status, create_and_enqueue, fast_settings, spawn_worker, wait_until,
};

/// Orders whose history does not hold exactly one PROCESSING and one COMPLETED.
pub async fn not_recorded_once(db: &PgPool) -> Vec<(uuid::Uuid, i64, i64)> {
    sqlx::query_as(
        "select o.id,
                count(*) filter (where h.status = 'PROCESSING'),
                count(*) filter (where h.status = 'COMPLETED')
         from orders o left join order_status_history h on h.order_id = o.id
         group by o.id
         having count(*) filter (where h.status = 'PROCESSING') <> 1
             or count(*) filter (where h.status = 'COMPLETED') <> 1",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

/// Damages the queue the ways a partial loss does, with at least twelve jobs waiting in it: of the first twelve, the
/// metadata of 0–3 is deleted and that of 4 loses a field, the data of 5–7 is deleted, 8–9 get data that is not
/// a job, 10 is listed twice, and 11 loses its id (its data stays, referred to by nothing); an id that is not
/// one is listed, and a stray metadata hash is left. Returns how many entries were damaged.
pub async fn damage(queue: &TestQueue) -> usize {
    let keys = queue.keys();
    let mut redis = queue.redis().await;
    // A push lands in the scheduled set; a fetch promotes it to the active list, as this does first.
    let scheduled: Vec<String> = redis.zrange(&keys.scheduled, 0, -1).await.unwrap();
    let _: () = redis.rpush(&keys.active, &scheduled).await.unwrap();
    let _: () = redis.del(&keys.scheduled).await.unwrap();
    let ids: Vec<String> = redis.lrange(&keys.active, 0, -1).await.unwrap();
    assert!(ids.len() >= 12, "{} jobs waiting", ids.len());
    for id in &ids[0..4] {
        let _: () = redis.del(keys.meta_of(id)).await.unwrap();
    }
    let _: () = redis
        .hdel(keys.meta_of(&ids[4]), "max_attempts")
        .await
        .unwrap();
    for id in &ids[5..8] {
        let _: () = redis.hdel(&keys.data, id).await.unwrap();
    }
    for id in &ids[8..10] {
        let _: () = redis.hset(&keys.data, id, "not a job").await.unwrap();
    }
    let _: () = redis.rpush(&keys.active, &ids[10]).await.unwrap();
    let _: () = redis.lrem(&keys.active, 0, &ids[11]).await.unwrap();
    let _: () = redis.lpush(&keys.active, "not-an-id").await.unwrap();
    let _: () = redis
        .hset(keys.meta_of("01KBZZZZZZZZZZZZZZZZZZZZZZ"), "attempts", 0)
        .await
        .unwrap();
    4 + 1 + 3 + 2 + 1 + 1 + 1 + 1
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn every_kind_of_partial_loss_is_healed_and_every_order_completes_once(db: PgPool) {
    let queue = TestQueue::new();
    let ids = create_and_enqueue(&db, &queue.push_queue(), 60).await;
    damage(&queue).await;
    let (stop, worker) = spawn_worker(&db, &queue.config, fast_settings());
    wait_until(Duration::from_secs(60), "60 completed orders", || async {
        count_with_status(&db, "COMPLETED").await == ids.len() as i64
    })
    .await;
    assert_eq!(not_recorded_once(&db).await, []);
    // Nothing unreadable is left behind: once the work is done the queue holds only its fixed keys and the
    // worker's own (see the README's "The queue at scale").
    wait_until(
        Duration::from_secs(10),
        "the queue's keys to be swept",
        || async { queue.existing_keys().await.len() <= 5 + 3 },
    )
    .await;
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_foreign_value_under_a_queue_key_is_deleted_and_processing_goes_on(db: PgPool) {
    let queue = TestQueue::new();
    let keys = queue.keys();
    let mut redis = queue.redis().await;
    let (stop, worker) = spawn_worker(&db, &queue.config, fast_settings());
    create_and_enqueue(&db, &queue.push_queue(), 5).await;
    wait_until(Duration::from_secs(30), "5 completed orders", || async {
        count_with_status(&db, "COMPLETED").await == 5
    })
    .await;
    // Every fetch, push and ack would fail on these with WRONGTYPE.
    let _: () = redis.set(&keys.active, "foreign").await.unwrap();
    let _: () = redis.set(&keys.data, "foreign").await.unwrap();
    let _: () = redis.hset(&keys.feed_lock, "foreign", 1).await.unwrap();
    create_and_enqueue(&db, &queue.push_queue(), 20).await;
    wait_until(Duration::from_secs(60), "25 completed orders", || async {
        count_with_status(&db, "COMPLETED").await == 25
    })
    .await;
    assert_eq!(not_recorded_once(&db).await, []);
    stop.cancel();
    worker.await.unwrap();
}
