//! The api with its in-process worker (`--with-worker`): orders move on their own.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use orders_core::queue::{self, QueueKeys};
use redis::AsyncCommands;
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

/// The statuses an order went through, in order (the history table's rows).
async fn history(app: &TestApp, id: &str) -> Vec<String> {
    sqlx::query_scalar(
        "select status::text from order_status_history where order_id = $1::uuid order by id",
    )
    .bind(id)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// Whether every job pushed to the app's queue has been handled: none waits to be fetched and no worker holds
/// one it has not acknowledged.
async fn queue_is_drained(app: &TestApp) -> bool {
    let mut config = crate::helpers::test_config().queue;
    config.queue_name = app.queue_name.clone();
    let keys = QueueKeys::new(&queue::queue_settings(&config));
    let mut redis = redis::Client::open(config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let scheduled: u64 = redis.zcard(&keys.scheduled).await.unwrap();
    let active: u64 = redis.llen(&keys.active).await.unwrap();
    let mut held = 0;
    let inflight: Vec<String> = redis.keys(format!("{}:*", keys.inflight)).await.unwrap();
    for set in inflight {
        held += redis.scard::<_, u64>(set).await.unwrap();
    }
    scheduled + active + held == 0
}

/// A cancel and the worker's claim are each one conditional update of the order's status: whichever lands first
/// wins and the other changes nothing. The worker spends a whole stage on a job before it claims the order,
/// which is enough to force both outcomes: a cancel sent as soon as the order exists lands while it is still
/// PENDING and wins; a cancel sent once the order was seen leaving PENDING loses. The cancels in between are
/// timed around the claim and race it for real: either outcome may come of them, but never a bit of both.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_cancel_racing_the_worker_either_wins_cleanly_or_gets_409(pool: PgPool) {
    // Far longer than any stall between a create and the cancel sent right after it, even on a loaded machine.
    const STAGE: Duration = Duration::from_secs(2);
    const RACERS: u32 = 8;
    let app = TestApp::spawn_with(pool, |config| {
        with_worker(STAGE.as_millis() as u64)(config);
        // A slot for every job, so that each job's stage starts as soon as its order is created.
        config.worker.worker_concurrency = Some(16);
    })
    .await;
    let user = app.new_user().await;
    let token = user.access.as_str();

    let early = app.create_widget(token).await;
    let early_cancel = app.cancel(token, &early).await;
    let late = app.create_widget(token).await;
    let mut racers = Vec::new();
    for _ in 0..RACERS {
        racers.push(app.create_widget(token).await);
    }
    let app = &app;
    let racing = join_all(racers.iter().enumerate().map(|(i, id)| async move {
        // From half a stage to one and a half after the create: around the moment the worker claims the order.
        tokio::time::sleep(STAGE / 2 + STAGE * i as u32 / (RACERS - 1)).await;
        let response = app.cancel(token, id).await;
        (id.clone(), response.status(), json(response).await)
    }));
    let losing = async {
        let started = Instant::now();
        while status_of(app, token, &late).await == "PENDING" {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the worker never took {late}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let response = app.cancel(token, &late).await;
        (late.clone(), response.status(), json(response).await)
    };
    let (mut outcomes, late_outcome) = tokio::join!(racing, losing);
    let early_outcome = (
        early.clone(),
        early_cancel.status(),
        json(early_cancel).await,
    );
    assert_eq!(early_outcome.1, StatusCode::OK, "{early_outcome:?}");
    assert_eq!(late_outcome.1, StatusCode::CONFLICT, "{late_outcome:?}");
    eprintln!(
        "racing cancels: {} won, {} lost",
        outcomes.iter().filter(|o| o.1 == StatusCode::OK).count(),
        outcomes
            .iter()
            .filter(|o| o.1 == StatusCode::CONFLICT)
            .count()
    );
    outcomes.push(early_outcome);
    outcomes.push(late_outcome);

    // Let the worker finish every job, including those of the cancelled orders, whose claims must then fail.
    let started = Instant::now();
    loop {
        let open: i64 = sqlx::query_scalar(
            "select count(*) from orders where status in ('PENDING', 'PROCESSING')",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        if open == 0 && queue_is_drained(app).await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{open} orders or their jobs never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, status, body) in outcomes {
        if status == StatusCode::OK {
            assert_eq!(body["status"], "CANCELLED", "{body}");
            assert_eq!(status_of(app, token, &id).await, "CANCELLED");
            assert_eq!(
                history(app, &id).await,
                ["CANCELLED"],
                "order {id} was cancelled but also processed"
            );
        } else {
            assert_eq!(status, StatusCode::CONFLICT, "order {id}: {body}");
            assert_eq!(
                body,
                json!({"detail": "Only pending orders can be cancelled"})
            );
            assert_eq!(status_of(app, token, &id).await, "COMPLETED");
            assert_eq!(
                history(app, &id).await,
                ["PROCESSING", "COMPLETED"],
                "order {id}"
            );
        }
    }
}
