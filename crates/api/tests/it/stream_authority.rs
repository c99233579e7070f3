//! An event stream lasts no longer than what it was opened with: its token's expiry and its session. A browser's
//! `EventSource`, which cannot send a header, opens the streams with the `order_events` cookie, and a reconnect
//! to a finished order gets `204`, which stops it.

use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::{StatusCode, header};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    auth::{claims, sign},
    events::{Stream, statuses},
    helpers::{TestApp, Tokens, json},
};

/// The id of the user `token` belongs to.
async fn user_id(app: &TestApp, token: &str) -> Uuid {
    json(app.get(token, "/auth/me").await).await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn logout(app: &TestApp, tokens: &Tokens) -> StatusCode {
    app.client
        .post(app.url("/auth/logout"))
        .bearer_auth(&tokens.access)
        .json(&json!({"refresh_token": tokens.refresh}))
        .send()
        .await
        .unwrap()
        .status()
}

/// Waits for the server to end `stream`, and returns the events it sent before.
async fn ended(stream: &mut Stream, within: Duration) -> Vec<String> {
    tokio::time::timeout(within, stream.rest())
        .await
        .expect("the stream ends")
        .iter()
        .map(|event| event.status().to_owned())
        .collect()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_stream_ends_when_its_token_expires_and_the_token_then_opens_none(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    let expires_at = Utc::now().timestamp() + 3;
    let token = sign(&claims(
        user_id(&app, &user.access).await,
        "access",
        expires_at,
    ));
    let opened = Instant::now();
    let mut all = Stream::start(&app, &token, "/orders/events", None).await;
    let mut one = Stream::start(&app, &token, &format!("/orders/{id}/events"), None).await;
    assert_eq!(
        statuses(&[one.next(Duration::from_secs(5)).await.unwrap()]),
        ["PENDING"]
    );
    assert_eq!(
        ended(&mut all, Duration::from_secs(10)).await,
        Vec::<String>::new()
    );
    assert_eq!(
        ended(&mut one, Duration::from_secs(10)).await,
        Vec::<String>::new()
    );
    // Not before the token's expiry (whole seconds: it may have been issued up to a second before `opened`).
    assert!(
        opened.elapsed() >= Duration::from_secs(1),
        "{:?}",
        opened.elapsed()
    );
    let again = Stream::open(&app, &token, "/orders/events", None).await;
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_logout_ends_the_sessions_streams_on_every_api_process_and_no_other(pool: PgPool) {
    // Two api processes' worth of apps on one database: streams on both, the logout through `a`.
    let a = TestApp::spawn(pool.clone()).await;
    let b = TestApp::spawn(pool).await;
    let user = a.new_user().await;
    let id = a.create_widget(&user.access).await;
    let mut on_a = Stream::start(&a, &user.access, "/orders/events", None).await;
    let mut on_b = Stream::start(&b, &user.access, &format!("/orders/{id}/events"), None).await;
    assert_eq!(
        on_b.next(Duration::from_secs(5)).await.unwrap().status(),
        "PENDING"
    );
    // The same user's other session (another device) is not logged out.
    let email = json(a.get(&user.access, "/auth/me").await).await["email"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = json(a.login(&email, crate::helpers::PASSWORD).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut other_stream = Stream::start(&b, &other, "/orders/events", None).await;

    assert_eq!(logout(&a, &user).await, StatusCode::NO_CONTENT);
    assert_eq!(
        ended(&mut on_a, Duration::from_secs(10)).await,
        Vec::<String>::new()
    );
    assert_eq!(
        ended(&mut on_b, Duration::from_secs(10)).await,
        Vec::<String>::new()
    );
    assert_eq!(a.cancel(&other, &id).await.status(), StatusCode::OK);
    let event = other_stream.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(event.status(), "CANCELLED");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_refresh_keeps_the_streams_and_a_reuse_that_revokes_the_session_ends_them_on_every_process(
    pool: PgPool,
) {
    let app = TestApp::spawn(pool.clone()).await;
    // The stream is held by another api process than the one that sees the reuse.
    let other = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let mut stream = Stream::start(&other, &user.access, "/orders/events", None).await;
    let renewed = json(app.refresh(&user.refresh).await).await;
    let access = renewed["access_token"].as_str().unwrap().to_owned();
    // Longer than a check of the sessions: the refreshed session goes on, and so does its stream.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let id = app.create_widget(&access).await;
    assert_eq!(app.cancel(&access, &id).await.status(), StatusCode::OK);
    let event = stream.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(event.status(), "CANCELLED");
    // The first refresh token again: a reuse, which revokes the session.
    assert_eq!(
        app.refresh(&user.refresh).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ended(&mut stream, Duration::from_secs(10)).await,
        Vec::<String>::new()
    );
}

/// The `order_events` cookie `POST /orders/events/cookie` sets for `access`, as `name=value`.
async fn events_cookie(app: &TestApp, access: &str) -> String {
    let response = app
        .client
        .post(app.url("/orders/events/cookie"))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let set_cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    for attribute in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/orders",
        "Max-Age=",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    set_cookie.split(';').next().unwrap().to_owned()
}

async fn get_with_cookie(app: &TestApp, cookie: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(app.url(path))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_events_cookie_opens_the_event_routes_and_nothing_else(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    let cookie = events_cookie(&app, &user.access).await;
    for path in [format!("/orders/{id}/events"), "/orders/events".to_owned()] {
        let response = get_with_cookie(&app, &cookie, &path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
    }
    for path in [
        format!("/orders/{id}"),
        "/orders/my-orders".to_owned(),
        "/auth/me".to_owned(),
    ] {
        let response = get_with_cookie(&app, &cookie, &path).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // Its token is no access token either.
    let token = cookie.split_once('=').unwrap().1;
    let response = Stream::open(&app, token, "/orders/events", None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let unauthenticated = app
        .client
        .post(app.url("/orders/events/cookie"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    // A logout clears it.
    let response = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(&user.access)
        .json(&json!({"refresh_token": user.refresh}))
        .send()
        .await
        .unwrap();
    let cleared: Vec<&str> = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect();
    assert!(
        cleared
            .iter()
            .any(|c| c.starts_with("order_events=;") && c.contains("Max-Age=0")),
        "{cleared:?}"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_reconnect_to_a_finished_order_after_its_last_change_gets_204(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    assert_eq!(app.cancel(&user.access, &id).await.status(), StatusCode::OK);
    let path = format!("/orders/{id}/events");
    let mut stream = Stream::start(&app, &user.access, &path, Some("0")).await;
    let events = stream.rest().await;
    assert_eq!(statuses(&events), ["CANCELLED"]);
    let last = events[0].id.clone();
    let response = Stream::open(&app, &user.access, &path, Some(&last)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.text().await.unwrap(), "");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_resume_too_far_back_says_reset_instead_of_replaying_the_history(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    // 1,001 changes of this user's order since event 0 (the history as a long-lived client would have missed it).
    sqlx::query(
        "insert into order_status_history (order_id, status)
         select $1::uuid, 'PROCESSING' from generate_series(1, 1001)",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    let last: i64 = sqlx::query_scalar("select max(id) from order_status_history")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut stream = Stream::start(&app, &user.access, "/orders/events", Some("0")).await;
    let reset = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id, last.to_string());
    assert_eq!(reset.data["replays_at_most"], 1000);
    // Live from there: the next change is sent, and nothing of the history.
    assert_eq!(app.cancel(&user.access, &id).await.status(), StatusCode::OK);
    let next = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (next.event.as_str(), next.status()),
        ("status", "CANCELLED")
    );
    // A resume within the bound replays.
    let mut near = Stream::start(
        &app,
        &user.access,
        "/orders/events",
        Some(&(last - 3).to_string()),
    )
    .await;
    let replayed = near.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(replayed.event, "status");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_consoles_overview_stream_ends_with_its_session(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.admin_overview_refresh_ms = 200).await;
    let email = app.register_with_role("operator").await.email;
    let login = json(app.login(&email, crate::helpers::PASSWORD).await).await;
    let tokens = Tokens {
        access: login["access_token"].as_str().unwrap().to_owned(),
        refresh: login["refresh_token"].as_str().unwrap().to_owned(),
    };
    let mut overview = Stream::start(&app, &tokens.access, "/admin/overview/events", None).await;
    let first = overview.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, "overview");

    assert_eq!(logout(&app, &tokens).await, StatusCode::NO_CONTENT);
    // It ends within a role and session check's interval (5 s), long before its token expires.
    let took = overview.time_to_end("its session").await;
    assert!(took < Duration::from_secs(8), "{took:?}");
}
