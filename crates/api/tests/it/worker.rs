//! The api with its in-process worker (`--with-worker`): orders move on their own.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{TestApp, json};

fn with_worker(stage_delay_ms: u64) -> impl FnOnce(&mut api::Config) {
    move |config| {
        config.with_worker = true;
        config.worker.order_stage_delay_ms = stage_delay_ms;
        config.worker.worker_poll_interval_ms = 20;
        config.worker.reconcile_interval_ms = 500;
    }
}

async fn status_of(app: &TestApp, token: &str, id: &str) -> String {
    json(app.get(token, &format!("/orders/{id}")).await).await["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_order_created_through_the_api_reaches_completed(pool: PgPool) {
    let app = TestApp::spawn_with(pool, with_worker(200)).await;
    let user = app.new_user().await;
    let created = Instant::now();
    let order = json(
        app.create_order(
            &user.access,
            &json!({"product_name": "Widget", "amount": 5}),
        )
        .await,
    )
    .await;
    let id = order["id"].as_str().unwrap();
    let mut seen = vec!["PENDING".to_owned()];
    while created.elapsed() < Duration::from_secs(10) {
        let status = status_of(&app, &user.access, id).await;
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "COMPLETED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, ["PENDING", "PROCESSING", "COMPLETED"]);
    // Two stages of 200 ms each: well under a second end to end.
    assert!(
        created.elapsed() >= Duration::from_millis(400),
        "{:?}",
        created.elapsed()
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_cancel_racing_the_worker_either_wins_cleanly_or_gets_409(pool: PgPool) {
    let app = TestApp::spawn_with(pool, with_worker(30)).await;
    let user = app.new_user().await;
    let body = json!({"product_name": "Widget", "amount": 1});
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(
            json(app.create_order(&user.access, &body).await).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let outcomes: Vec<(String, StatusCode)> = join_all(
        ids.iter()
            .map(|id| async { (id.clone(), app.cancel(&user.access, id).await.status()) }),
    )
    .await;
    let cancelled: Vec<&String> = outcomes
        .iter()
        .filter(|(_, s)| *s == StatusCode::OK)
        .map(|(id, _)| id)
        .collect();
    let refused: Vec<&String> = outcomes
        .iter()
        .filter(|(_, s)| *s == StatusCode::CONFLICT)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(cancelled.len() + refused.len(), 100, "{outcomes:?}");
    eprintln!(
        "race: {} cancelled, {} refused",
        cancelled.len(),
        refused.len()
    );

    // Let the worker finish everything it took.
    let started = Instant::now();
    loop {
        let open: i64 = sqlx::query_scalar(
            "select count(*) from orders where status in ('PENDING', 'PROCESSING')",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{open} orders never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in cancelled {
        assert_eq!(status_of(&app, &user.access, id).await, "CANCELLED");
        let history: Vec<String> = sqlx::query_scalar(
            "select status::text from order_status_history where order_id = $1::uuid order by id",
        )
        .bind(id)
        .fetch_all(&app.db)
        .await
        .unwrap();
        assert_eq!(
            history,
            ["CANCELLED"],
            "order {id} was cancelled but also processed"
        );
    }
    for id in refused {
        assert_eq!(status_of(&app, &user.access, id).await, "COMPLETED");
    }
}
