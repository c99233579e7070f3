//! A backlog through the api: past `QUEUE_MAX_JOBS` a create still answers 201 and the order waits in
//! PostgreSQL; readiness does not fail; `/metrics` shows the backpressure; the reconciler feeds the backlog.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sqlx::PgPool;

use crate::helpers::{TestApp, json};

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn past_the_queue_bound_orders_wait_in_postgresql_and_the_service_stays_ready(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.queue.queue_max_jobs = 2).await;
    let user = app.new_user().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.create_widget(&user.access).await);
    }
    assert_eq!(app.queued_order_ids(), ids[..2]);
    let never_pushed: Vec<String> =
        sqlx::query_scalar("select id::text from orders where enqueued_at is null")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(never_pushed, ids[2..]);

    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let metrics = app.metrics().await;
    for series in [
        "queue_jobs_waiting ",
        "orders_pending ",
        "orders_oldest_pending_age_seconds ",
        "orders_deferred_total ",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_created_past_the_bound_are_fed_to_the_worker_and_complete(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        config.queue.queue_max_jobs = 3;
        config.with_worker = true;
        config.worker.order_stage_delay_ms = 0;
        config.worker.worker_poll_interval_ms = 20;
        config.worker.reconcile_interval_ms = 200;
    })
    .await;
    let user = app.new_user().await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(app.create_widget(&user.access).await);
    }
    let started = Instant::now();
    for id in &ids {
        loop {
            let order = json(app.get(&user.access, &format!("/orders/{id}")).await).await;
            if order["status"] == "COMPLETED" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "order {id} is still {}",
                order["status"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
