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
    assert_eq!(history(&db, id).await, ["PROCESSING", "COMPLETED"]);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_reclaim_after_a_failed_completion_records_processing_once(db: PgPool) {
    let [id] = new_orders(&db, 1).await[..] else {
        unreachable!()
    };
    let a = processor(&db, "a", Duration::from_secs(10));
    a.claim(id).await.unwrap().expect("a claims");
    // The completion never reached the database (it was down); the job is retried once the lease has run out.
    sqlx::query("update orders set lease_until = now() - interval '1 second'")
        .execute(&db)
        .await
        .unwrap();
    let again = a.claim(id).await.unwrap().expect("a claims it again");
    assert_eq!(again.previous, OrderStatus::Processing);
    assert!(a.complete(id, &again).await.unwrap());
    assert_eq!(history(&db, id).await, ["PROCESSING", "COMPLETED"]);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_claims_of_a_failed_consumer_are_given_back_without_costing_an_attempt(db: PgPool) {
    let [id, other] = new_orders(&db, 2).await[..] else {
        unreachable!()
    };
    let a = processor(&db, "worker-a", Duration::from_secs(60));
    let ab = processor(&db, "worker-ab", Duration::from_secs(60));
    a.claim(id).await.unwrap().expect("a claims");
    ab.claim(other).await.unwrap().expect("ab claims");
    // worker-a's consumer failed and dropped the job: its claim goes, worker-ab's (another process) stays.
    let released = orders_core::db::orders::release_claims_of(&db, "worker-a")
        .await
        .unwrap();
    assert_eq!(released, [id]);
    let attempts: i32 = sqlx::query_scalar("select attempts from orders where id = $1")
        .bind(id.0)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "the dropped claim cost the order nothing");
    let b = processor(&db, "worker-b", Duration::from_secs(60));
    let claim = b
        .claim(id)
        .await
        .unwrap()
        .expect("taken over at once, not after the lease");
    assert_eq!(claim.previous, OrderStatus::Processing);
    assert!(b.complete(id, &claim).await.unwrap());
    assert_eq!(history(&db, id).await, ["PROCESSING", "COMPLETED"]);
    assert!(
        b.claim(other).await.unwrap().is_err(),
        "worker-ab's claim is alive"
    );
}

/// The statuses `order_status_history` recorded for `id`, in order.
async fn history(db: &PgPool, id: orders_core::domain::OrderId) -> Vec<String> {
    sqlx::query_scalar(
        "select status::text from order_status_history where order_id = $1 order by id",
    )
    .bind(id.0)
    .fetch_all(db)
    .await
    .unwrap()
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

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_heartbeat_shorter_than_a_second_is_refused(_db: PgPool) {
    let mut settings = crate::helpers::fast_settings();
    settings.worker_heartbeat_ms = 500;
    assert_eq!(
        settings.validate(),
        Err(worker::config::SettingsError::HeartbeatTooShort(500))
    );
    settings.worker_heartbeat_ms = 1000;
    assert!(settings.validate().is_ok());
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_batch_claims_each_order_once_even_when_it_holds_two_attempts_at_one(db: PgPool) {
    use orders_core::db::orders::{self as db, Attempt};
    let ids = new_orders(&db, 3).await;
    let attempt = |i: usize, token: &str| Attempt {
        id: ids[i],
        token: token.to_owned(),
    };
    // ids[0] twice (two deliveries of one job met in one batch), ids[1] once; ids[2] is cancelled.
    sqlx::query("update orders set status = 'CANCELLED' where id = $1")
        .bind(ids[2].0)
        .execute(&db)
        .await
        .unwrap();
    let batch = [
        attempt(0, "w/a"),
        attempt(1, "w/b"),
        attempt(0, "w/c"),
        attempt(2, "w/d"),
    ];
    let claimed = db::claim_for_processing(&db, &batch, Duration::from_secs(10), 5)
        .await
        .unwrap();
    let tokens: Vec<&str> = claimed.iter().map(|(token, _)| token.as_str()).collect();
    assert_eq!(claimed.len(), 2, "{tokens:?}");
    assert!(tokens.contains(&"w/b"));
    assert!(
        tokens.contains(&"w/a") != tokens.contains(&"w/c"),
        "exactly one attempt at ids[0] wins: {tokens:?}"
    );
    assert!(
        claimed
            .iter()
            .all(|(_, previous)| *previous == OrderStatus::Pending)
    );
    assert_eq!(status_of(&db, ids[2]).await, OrderStatus::Cancelled);

    // Completing with every token: only the winners' complete, each order once.
    let completed = db::complete_processing(&db, &batch).await.unwrap();
    let mut completed: Vec<&str> = completed.iter().map(String::as_str).collect();
    completed.sort_unstable();
    let mut winners = tokens.clone();
    winners.sort_unstable();
    assert_eq!(completed, winners);
    for status in ["PROCESSING", "COMPLETED"] {
        let mut counts = transitions(&db, status).await;
        counts.sort_unstable();
        let mut expected = vec![(ids[0].0, 1), (ids[1].0, 1), (ids[2].0, 0)];
        expected.sort_unstable();
        assert_eq!(counts, expected, "{status}");
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn many_processors_racing_over_the_same_orders_complete_each_exactly_once(db: PgPool) {
    // Four workers each get a job for every one of 300 orders, all at once: their claims and completions are
    // batched (the batches of different workers lock the same rows), and each order still moves once per step.
    let ids = new_orders(&db, 300).await;
    let workers: Vec<Processor> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| processor(&db, name, Duration::from_secs(10)))
        .collect();
    let mut jobs = tokio::task::JoinSet::new();
    for worker in &workers {
        for &id in &ids {
            let worker = worker.clone();
            jobs.spawn(async move { worker.process(id).await });
        }
    }
    let mut completed = 0;
    while let Some(outcome) = jobs.join_next().await {
        match outcome.unwrap().unwrap() {
            Outcome::Completed => completed += 1,
            Outcome::Skipped(_) => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(completed, ids.len());
    let processing = transitions(&db, "PROCESSING").await;
    let done = transitions(&db, "COMPLETED").await;
    assert_eq!(processing.len(), ids.len());
    assert_eq!(done.len(), ids.len());
    assert!(processing.iter().chain(&done).all(|(_, n)| *n == 1));
}
