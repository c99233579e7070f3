//! A 503 means "not created": a create answered 503 (its time ran out, or too many creates were waiting), or
//! whose client hung up while it waited, leaves no order, then or later. Each test holds the inserts behind a
//! table lock, answers or abandons the requests, releases the lock, then sends one more create through the same
//! single statement slot: once it is answered, every earlier create has been dealt with.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::helpers::{TestApp, json};

/// A pool of 2 on the test's database: one statement slot for creates and one for list reads, so that requests
/// queue behind a blocked statement.
async fn pool_of_two(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap()
}

/// Takes `mode` on `orders` in a transaction of its own, held until it is rolled back.
async fn lock_orders(pool: &PgPool, mode: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "lock table orders in {mode} mode"
    )))
    .execute(&mut *lock)
    .await
    .unwrap();
    lock
}

/// Waits until a statement of the test's database waits for a lock.
async fn until_a_statement_waits_for_the_lock(pool: &PgPool) {
    let started = Instant::now();
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if blocked > 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no statement waits for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn widget() -> Value {
    json!({"product_name": "Widget", "amount": 19.99})
}

async fn create_with_key(app: &TestApp, token: &str, key: &str) -> Response {
    app.client
        .post(app.url("/orders/create"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&widget())
        .send()
        .await
        .unwrap()
}

/// Asserts a 503 in the contract's shape, with a `Retry-After` of whole seconds.
async fn assert_503_with_retry_after(response: Response) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = response.headers()[reqwest::header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert!(json(response).await["detail"].is_string());
}

async fn keys_stored(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "select idempotency_key from orders where idempotency_key is not null order by 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn creates_answered_503_behind_a_locked_table_are_never_inserted(pool: PgPool) {
    // Request timeout 5.7 s (0.1 + 2 + 3 + 0.1 + 0.5); each insert is given until 5.1 s after its request began.
    let app = TestApp::spawn_with(pool_of_two(&pool).await, |config| {
        config.enqueue_timeout_ms = 100;
    })
    .await;
    let user = app.new_user().await;
    let lock = lock_orders(&pool, "exclusive").await;

    // Without Idempotency-Key: a retry of any of these would create a second order if the first appeared later.
    // The first blocks in the only statement slot; the others wait behind it, then in a statement of their own.
    let body = widget();
    let responses = join_all((0..4).map(|_| app.create_order(&user.access, &body))).await;
    for response in responses {
        assert_503_with_retry_after(response).await;
    }
    lock.rollback().await.unwrap();

    // Through the same slot, after every create above: the batcher had every chance to insert them by now.
    let kept = app.create_widget(&user.access).await;
    assert_eq!(app.count("orders").await, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids: Vec<String> = sqlx::query_scalar("select id::text from orders")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, [kept]);
    assert_eq!(app.queued_order_ids(), ids);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_create_whose_client_hangs_up_while_its_insert_waits_is_not_inserted(pool: PgPool) {
    // The statement timeout (8 s) and the request's own time (10.7 s) are far off: only the hang-up gives it up.
    let app = TestApp::spawn_with(pool_of_two(&pool).await, |config| {
        config.enqueue_timeout_ms = 100;
        config.database.database_statement_timeout_ms = 8000;
    })
    .await;
    let user = app.new_user().await;
    let lock = lock_orders(&pool, "exclusive").await;

    let impatient = Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let request = impatient
        .post(app.url("/orders/create"))
        .bearer_auth(&user.access)
        .header("Idempotency-Key", "hung-up")
        .json(&widget())
        .send();
    let (answer, ()) = tokio::join!(request, until_a_statement_waits_for_the_lock(&pool));
    assert!(answer.unwrap_err().is_timeout());
    // The insert was under way when the client left: releasing the lock lets the statement finish, and its commit
    // is refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.rollback().await.unwrap();

    let response = create_with_key(&app, &user.access, "patient").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(keys_stored(&pool).await, ["patient"]);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn past_batch_max_waiting_creates_are_shed_with_503_and_write_nothing(pool: PgPool) {
    let app = TestApp::spawn_with(pool_of_two(&pool).await, |config| {
        config.enqueue_timeout_ms = 100;
        config.database.database_statement_timeout_ms = 8000;
        config.batch_max_waiting = 1;
    })
    .await;
    let user = app.new_user().await;
    let lock = lock_orders(&pool, "exclusive").await;

    let first = tokio::spawn({
        let (client, url, token) = (
            app.client.clone(),
            app.url("/orders/create"),
            user.access.clone(),
        );
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "first")
                .json(&widget())
                .send()
                .await
                .unwrap()
        }
    });
    until_a_statement_waits_for_the_lock(&pool).await;

    // Behind the blocked statement at most two wait (one taken off the queue for the next statement, one on
    // it): of six more, four at least are refused at once, while the lock still holds.
    let more: Vec<_> = (0..6)
        .map(|i| {
            let (client, url, token) = (
                app.client.clone(),
                app.url("/orders/create"),
                user.access.clone(),
            );
            tokio::spawn(async move {
                let response = client
                    .post(url)
                    .bearer_auth(token)
                    .header("Idempotency-Key", format!("more-{i}"))
                    .json(&widget())
                    .send()
                    .await
                    .unwrap();
                (format!("more-{i}"), response)
            })
        })
        .collect();
    let started = Instant::now();
    while more.iter().filter(|task| task.is_finished()).count() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "fewer than 4 creates were shed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.rollback().await.unwrap();

    assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
    let mut shed = Vec::new();
    let mut created = vec!["first".to_owned()];
    for task in more {
        let (key, response) = task.await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_503_with_retry_after(response).await;
            shed.push(key);
        } else {
            assert_eq!(response.status(), StatusCode::CREATED, "{key}");
            created.push(key);
        }
    }
    assert!(shed.len() >= 4, "shed {shed:?}");
    let barrier = create_with_key(&app, &user.access, "last").await;
    assert_eq!(barrier.status(), StatusCode::CREATED);
    created.push("last".to_owned());
    created.sort();
    assert_eq!(keys_stored(&pool).await, created);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn past_batch_max_waiting_list_reads_are_shed_with_503(pool: PgPool) {
    let app = TestApp::spawn_with(pool_of_two(&pool).await, |config| {
        config.batch_max_waiting = 1;
    })
    .await;
    let user = app.new_user().await;
    app.create_widget(&user.access).await;
    // Reads wait for this one.
    let lock = lock_orders(&pool, "access exclusive").await;

    let read = |app: &TestApp| {
        let (client, url, token) = (
            app.client.clone(),
            app.url("/orders/my-orders"),
            user.access.clone(),
        );
        tokio::spawn(async move { client.get(url).bearer_auth(token).send().await.unwrap() })
    };
    let mut reads = vec![read(&app)];
    until_a_statement_waits_for_the_lock(&pool).await;
    // Behind the blocked read at most two wait: of seven more, five at least are refused at once.
    reads.extend((0..7).map(|_| read(&app)));
    let started = Instant::now();
    while reads.iter().filter(|task| task.is_finished()).count() < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "fewer than 5 reads were shed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.rollback().await.unwrap();

    let mut shed = 0;
    for task in reads {
        let response = task.await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_503_with_retry_after(response).await;
            shed += 1;
        } else {
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(json(response).await.as_array().unwrap().len(), 1);
        }
    }
    assert!(shed >= 5, "{shed} shed");
}
