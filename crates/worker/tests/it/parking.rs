//! Orders that keep failing are parked after ORDER_MAX_ATTEMPTS instead of being pushed again forever, and
//! `worker requeue` re-drives them.

use std::{process::Command, time::Duration};

use orders_core::{db::orders as db, domain::OrderStatus};
use sqlx::PgPool;
use worker::{Outcome, ProcessError, Processor};

use crate::helpers::{
    TestQueue, database_url, fast_settings, new_orders, spawn_worker, status_of, wait_until,
};

/// Makes every claim of `id` fail in PostgreSQL, as a persistent fault would (a trigger, not a mock: the
/// worker's real statement is refused by the real server).
async fn break_claims_of(db: &PgPool, id: uuid::Uuid) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create function refuse_claim() returns trigger language plpgsql as $$
         begin raise exception 'simulated persistent fault'; end $$;
         create trigger refuse_claim before update of status on orders for each row
         when (new.id = '{id}' and new.status = 'PROCESSING') execute function refuse_claim();"
    )))
    .execute(db)
    .await
    .unwrap();
}

async fn heal_claims(db: &PgPool) {
    sqlx::raw_sql("drop trigger refuse_claim on orders; drop function refuse_claim();")
        .execute(db)
        .await
        .unwrap();
}

/// attempts, parked, last error.
async fn attempts_of(db: &PgPool, id: uuid::Uuid) -> (i32, bool, Option<String>) {
    sqlx::query_as("select attempts, parked_at is not null, last_error from orders where id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_order_that_cannot_be_claimed_costs_the_orders_batched_with_it_nothing(db: PgPool) {
    // 40 jobs at once share claim statements; one of their orders is refused by PostgreSQL every time.
    let ids = new_orders(&db, 40).await;
    break_claims_of(&db, ids[7].0).await;
    let worker = Processor::new(db.clone(), "w", Duration::from_secs(10), Duration::ZERO)
        .with_max_attempts(3);
    let mut jobs = tokio::task::JoinSet::new();
    for &id in &ids {
        let worker = worker.clone();
        jobs.spawn(async move { (id, worker.run_job(id).await) });
    }
    while let Some(joined) = jobs.join_next().await {
        let (id, result) = joined.unwrap();
        if id == ids[7] {
            let failure = result.expect_err("the refused order fails");
            assert!(!failure.parked);
        } else {
            assert_eq!(result.unwrap(), Outcome::Completed, "order {id}");
            assert_eq!(attempts_of(&db, id.0).await, (1, false, None), "order {id}");
        }
    }
    let (attempts, parked, _) = attempts_of(&db, ids[7].0).await;
    assert_eq!((attempts, parked), (1, false));
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_job_that_always_fails_is_parked_after_its_attempts(db: PgPool) {
    let [id] = new_orders(&db, 1).await[..] else {
        unreachable!()
    };
    break_claims_of(&db, id.0).await;
    let worker = Processor::new(db.clone(), "w", Duration::from_secs(10), Duration::ZERO)
        .with_max_attempts(3);
    for attempt in 1..=3 {
        let failure = worker.run_job(id).await.expect_err("the claim is refused");
        assert!(
            matches!(
                failure.error,
                ProcessError::Database(_) | ProcessError::Batch(_)
            ),
            "{failure}"
        );
        assert_eq!(failure.parked, attempt == 3, "attempt {attempt}");
        let (attempts, parked, error) = attempts_of(&db, id.0).await;
        assert_eq!((attempts, parked), (attempt, attempt == 3));
        assert!(error.unwrap().contains("simulated persistent fault"));
    }
    // Parked: the reconciler no longer pushes it, however old it gets.
    sqlx::query("update orders set enqueued_at = now() - interval '1 hour'")
        .execute(&db)
        .await
        .unwrap();
    let due = db::take_due_for_enqueue(&db, Duration::ZERO, 100)
        .await
        .unwrap();
    assert!(due.is_empty(), "a parked order was pushed again: {due:?}");
    assert_eq!(status_of(&db, id).await, OrderStatus::Pending);

    // Re-driven once the fault is gone, it completes.
    heal_claims(&db).await;
    let output = requeue(&db, &[&id.to_string()]);
    assert!(
        output.contains(&id.to_string()) && output.contains("attempts=3"),
        "{output}"
    );
    assert_eq!(attempts_of(&db, id.0).await, (0, false, None));
    let due = db::take_due_for_enqueue(&db, Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(due.iter().map(|d| d.id).collect::<Vec<_>>(), [id]);
    assert_eq!(worker.run_job(id).await.unwrap(), Outcome::Completed);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_order_whose_workers_keep_dying_is_parked(db: PgPool) {
    let [id] = new_orders(&db, 1).await[..] else {
        unreachable!()
    };
    // Each claim's worker "dies": its lease runs out and the next one takes over.
    let worker = Processor::new(db.clone(), "w", Duration::from_millis(50), Duration::ZERO)
        .with_max_attempts(3);
    for _ in 0..3 {
        worker.claim(id).await.unwrap().expect("claimed");
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(worker.process(id).await.unwrap(), Outcome::Parked);
    let (attempts, parked, _) = attempts_of(&db, id.0).await;
    assert_eq!((attempts, parked), (3, true));
    assert_eq!(status_of(&db, id).await, OrderStatus::Processing);
    let due = db::take_due_for_enqueue(&db, Duration::ZERO, 100)
        .await
        .unwrap();
    assert!(due.is_empty(), "{due:?}");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_running_worker_parks_a_failing_order_and_completes_the_rest(db: PgPool) {
    let ids = new_orders(&db, 5).await;
    break_claims_of(&db, ids[0].0).await;
    let queue = TestQueue::new();
    let mut settings = fast_settings();
    settings.order_max_attempts = 3;
    let (stop, running) = spawn_worker(&db, &queue.config, settings);
    // The reconciler feeds the never-pushed orders; the failing one is retried (by apalis and the reconciler)
    // until it is parked.
    wait_until(
        Duration::from_secs(60),
        "the failing order to be parked",
        || async { attempts_of(&db, ids[0].0).await.1 },
    )
    .await;
    for id in &ids[1..] {
        wait_until(
            Duration::from_secs(30),
            "the healthy orders to complete",
            || async { status_of(&db, *id).await == OrderStatus::Completed },
        )
        .await;
    }
    let (attempts, _, _) = attempts_of(&db, ids[0].0).await;
    assert_eq!(attempts, 3);
    // Parked for good: a while later, it has had no more attempts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(attempts_of(&db, ids[0].0).await.0, 3);
    stop.cancel();
    running.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn requeue_stuck_redrives_parked_and_abandoned_orders_only(db: PgPool) {
    let ids = new_orders(&db, 4).await;
    // 0: parked; 1: PROCESSING with an expired lease; 2: PROCESSING with a live lease; 3: COMPLETED.
    sqlx::query(
        "update orders set parked_at = now(), attempts = 5, last_error = 'boom' where id = $1",
    )
    .bind(ids[0].0)
    .execute(&db)
    .await
    .unwrap();
    for (id, lease) in [(ids[1], "-1 minute"), (ids[2], "1 minute")] {
        sqlx::query(
            "update orders set status = 'PROCESSING', locked_by = 'x', enqueued_at = now(),
                               lease_until = now() + $2::interval where id = $1",
        )
        .bind(id.0)
        .bind(lease)
        .execute(&db)
        .await
        .unwrap();
    }
    sqlx::query("update orders set status = 'COMPLETED' where id = $1")
        .bind(ids[3].0)
        .execute(&db)
        .await
        .unwrap();
    let output = requeue(&db, &["--stuck"]);
    assert!(
        output.contains(&format!("{}\tPENDING\tattempts=5\tboom", ids[0])),
        "{output}"
    );
    assert!(
        output.contains(&format!("{}\tPROCESSING", ids[1])),
        "{output}"
    );
    assert!(
        !output.contains(&ids[2].to_string()) && !output.contains(&ids[3].to_string()),
        "{output}"
    );
    assert!(output.contains("re-drove 2 order(s)"), "{output}");
    let due: Vec<_> = db::take_due_for_enqueue(&db, Duration::from_secs(60), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(due, [ids[0], ids[1]]);
}

/// Runs `worker requeue ARGS` on the test's database; returns its stdout. Fails the test if it fails.
fn requeue(db: &PgPool, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("requeue")
        .args(args)
        .env("DATABASE_URL", database_url(db))
        .env("RUST_LOG", "warn")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "worker requeue failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
