//! The handler, step by step: no sleeps, no queue.

use std::time::Duration;

use orders_core::domain::OrderStatus;
use sqlx::PgPool;
use worker::{Outcome, ProcessError, Processor};

use crate::helpers::{new_orders, status_of, transitions};

fn processor(db: &PgPool, name: &str, lease: Duration) -> Processor {
    Processor::new(db.clone(), name, lease, Duration::ZERO)
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_pending_order_goes_through_processing_to_completed(db: PgPool) {
    let [id] = new_orders(&db, 1).await[..] else {
        unreachable!()
    };
    let worker = processor(&db, "a", Duration::from_secs(10));
    let claim = worker.claim(id).await.unwrap().expect("claimed");
    assert_eq!(claim.previous, OrderStatus::Pending);
    assert_eq!(status_of(&db, id).await, OrderStatus::Processing);
    assert!(worker.complete(id, &claim).await.unwrap());
    assert_eq!(status_of(&db, id).await, OrderStatus::Completed);
    let (lease, locked_by): (Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
        sqlx::query_as("select lease_until, locked_by from orders")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((lease, locked_by), (None, None));
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn cancelled_and_completed_orders_are_left_alone(db: PgPool) {
    let ids = new_orders(&db, 2).await;
    sqlx::query("update orders set status = 'CANCELLED' where id = $1")
        .bind(ids[0].0)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("update orders set status = 'COMPLETED' where id = $1")
        .bind(ids[1].0)
        .execute(&db)
        .await
        .unwrap();
    let worker = processor(&db, "a", Duration::from_secs(10));
    assert_eq!(
        worker.process(ids[0]).await.unwrap(),
        Outcome::Skipped(OrderStatus::Cancelled)
    );
    assert_eq!(
        worker.process(ids[1]).await.unwrap(),
        Outcome::Skipped(OrderStatus::Completed)
    );
    assert_eq!(
        worker.claim(ids[0]).await.unwrap(),
        Err(OrderStatus::Cancelled)
    );
    assert_eq!(status_of(&db, ids[0]).await, OrderStatus::Cancelled);
    assert_eq!(status_of(&db, ids[1]).await, OrderStatus::Completed);
    let history: i64 = sqlx::query_scalar("select count(*) from order_status_history")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(history, 0);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_duplicate_delivery_changes_nothing(db: PgPool) {
    let [id] = new_orders(&db, 1).await[..] else {
        unreachable!()
    };
    let worker = processor(&db, "a", Duration::from_secs(10));
    assert_eq!(worker.process(id).await.unwrap(), Outcome::Completed);
    let updated_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select updated_at from orders")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        worker.process(id).await.unwrap(),
        Outcome::Skipped(OrderStatus::Completed)
    );
    assert_eq!(
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("select updated_at from orders")
            .fetch_one(&db)
            .await
            .unwrap(),
        updated_at
    );
    assert_eq!(transitions(&db, "PROCESSING").await[0].1, 1);
    assert_eq!(transitions(&db, "COMPLETED").await[0].1, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_delivery_while_another_worker_holds_the_order_does_nothing(db: PgPool) {
    let [id] = new_orders(&db, 1).await[..] else {
        unreachable!()
    };
    let a = processor(&db, "a", Duration::from_secs(10));
    let b = processor(&db, "b", Duration::from_secs(10));
    let claim = a.claim(id).await.unwrap().expect("a claims");
    assert_eq!(b.claim(id).await.unwrap(), Err(OrderStatus::Processing));
    assert!(a.complete(id, &claim).await.unwrap());
    assert_eq!(transitions(&db, "PROCESSING").await[0].1, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete(db: PgPool) {
    let [id] = new_orders(&db, 1).await[..] else {
        unreachable!()
    };
    let a = processor(&db, "a", Duration::from_secs(10));
    let b = processor(&db, "b", Duration::from_secs(10));
    let stale = a.claim(id).await.unwrap().expect("a claims");
    // a's worker dies; its lease runs out.
    sqlx::query("update orders set lease_until = now() - interval '1 second'")
        .execute(&db)
        .await
        .unwrap();
    let claim = b.claim(id).await.unwrap().expect("b takes over");
    assert_eq!(claim.previous, OrderStatus::Processing);
    assert!(!a.complete(id, &stale).await.unwrap(), "a lost its lease");
    assert_eq!(status_of(&db, id).await, OrderStatus::Processing);
    assert!(b.complete(id, &claim).await.unwrap());
    assert_eq!(status_of(&db, id).await, OrderStatus::Completed);
    assert_eq!(transitions(&db, "COMPLETED").await[0].1, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_missing_order_is_a_permanent_failure(db: PgPool) {
    let worker = processor(&db, "a", Duration::from_secs(10));
    let err = worker
        .process(orders_core::domain::OrderId::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ProcessError::OrderMissing(_)));
    assert!(err.is_permanent());
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_lease_too_short_for_the_stage_delay_is_refused(_db: PgPool) {
    let mut settings = crate::helpers::fast_settings();
    settings.order_stage_delay_ms = 2000;
    settings.order_lease_ms = 3000;
    assert!(settings.validate().is_err());
    settings.order_lease_ms = 4001;
    assert!(settings.validate().is_ok());
}
