//! Races between a stream opening and a change committing, made deterministic with a transaction the test holds.

use std::time::Duration;

use reqwest::StatusCode;
use sqlx::{Connection, PgConnection, PgPool};

use crate::{
    events::{Stream, statuses},
    helpers::{TestApp, database_url_of},
};

/// Waits until a statement of another connection waits on a lock (behind the test's), or `done` says there is no
/// need (the statement finished without waiting).
async fn until_a_statement_waits_on_a_lock(pool: &PgPool, done: impl Fn() -> bool) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 || done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no statement waited on the test's lock");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_change_committing_while_an_order_stream_opens_is_its_first_event_and_ends_it(
    pool: PgPool,
) {
    let app = TestApp::spawn(pool.clone()).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    // A cancel, held uncommitted, with the history locked: the stream's read of the order sees it PENDING, and its
    // read of the history waits until the cancel has committed.
    let mut held = held_cancel(&pool, &id).await;
    sqlx::query("lock table order_status_history in access exclusive mode")
        .execute(&mut held)
        .await
        .unwrap();
    let path = format!("/orders/{id}/events");
    let opening = {
        let (app_base, token) = (app.base.clone(), user.access.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(format!("{app_base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        })
    };
    until_a_statement_waits_on_a_lock(&pool, || false).await;
    commit(held).await;
    let response = opening.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = Stream::from_response(response);
    // The order as it is once the cancel committed, under the cancel's id, and nothing after: the stream ends.
    let events = tokio::time::timeout(Duration::from_secs(10), stream.rest())
        .await
        .expect("the stream ends after CANCELLED");
    assert_eq!(statuses(&events), ["CANCELLED"]);
    assert_ne!(events[0].id, "0");
}

/// A cancel of `order` in a transaction the test holds open (`commit` ends it): its history row has taken its id,
/// and is not committed.
async fn held_cancel(pool: &PgPool, order: &str) -> PgConnection {
    let mut held = PgConnection::connect(&database_url_of(pool)).await.unwrap();
    for statement in [
        "begin",
        "update orders set status = 'CANCELLED' where id = $1::uuid",
        "insert into order_status_history (order_id, status) values ($1::uuid, 'CANCELLED')",
    ] {
        let query = sqlx::query(statement);
        let query = if statement.contains("$1") {
            query.bind(order)
        } else {
            query
        };
        query.execute(&mut held).await.unwrap();
    }
    held
}

async fn commit(mut held: PgConnection) {
    sqlx::query("commit").execute(&mut held).await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_change_that_commits_after_a_later_one_still_reaches_the_stream_of_all_my_orders(
    pool: PgPool,
) {
    let app = TestApp::spawn(pool.clone()).await;
    let user = app.new_user().await;
    let first = app.create_widget(&user.access).await;
    let second = app.create_widget(&user.access).await;
    // The first order's change takes its id now and commits last.
    let held = held_cancel(&pool, &first).await;
    let cancelling = {
        let (base, token, id) = (app.base.clone(), user.access.clone(), second.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .patch(format!("{base}/orders/{id}/cancel"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // The second order's cancel commits, or waits for the held change to commit first: either way, once it has
    // settled, the stream opens.
    until_a_statement_waits_on_a_lock(&pool, || cancelling.is_finished()).await;
    let mut stream = Stream::start(&app, &user.access, "/orders/events", None).await;
    commit(held).await;
    assert_eq!(cancelling.await.unwrap(), StatusCode::OK);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = stream
            .next(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("the stream ended after {seen:?}"));
        seen.push((
            event.data["id"].as_str().unwrap().to_owned(),
            event.status().to_owned(),
        ));
    }
    seen.sort();
    let mut expected = vec![
        (first, "CANCELLED".to_owned()),
        (second, "CANCELLED".to_owned()),
    ];
    expected.sort();
    assert_eq!(seen, expected, "each change once");
}
