//! The HTTP server itself (`api::serve`): a stop lets the requests in flight finish, and refuses new connections.

use std::time::Duration;

use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::TestApp;

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_stop_finishes_the_request_in_flight_and_refuses_new_connections(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // A create whose body is still arriving when the server is told to stop: its handler is waiting for the rest.
    let body = r#"{"product_name": "Widget", "amount": 19.99}"#;
    let (first, rest) = body.split_at(10);
    let mut client = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /orders/create HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{first}",
        user.access,
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    app.begin_stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !app.server.is_finished(),
        "the server stopped with a request in flight"
    );
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "a stopping server accepted a new connection"
    );

    client.write_all(rest.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        client.read_to_string(&mut response),
    )
    .await
    .expect("no answer to the request in flight")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 201 "), "{response}");
    let created: i64 = sqlx::query_scalar("select count(*) from orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(created, 1);

    // The answer was the connection's last: the server has stopped.
    let mut app = app;
    tokio::time::timeout(Duration::from_secs(10), &mut app.server)
        .await
        .expect("the server did not stop once its last request was answered")
        .unwrap()
        .unwrap();
}

/// Reads from `stream` until what was read contains `needle`; panics on EOF or after 20 s.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut chunk = [0; 4096];
    tokio::time::timeout(Duration::from_secs(20), async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(
                read > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&chunk[..read]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no {needle:?} within 20 s: {}",
            String::from_utf8_lossy(&seen)
        )
    });
    String::from_utf8_lossy(&seen).into_owned()
}

/// Whether the server closes `stream` (end of file or reset) within `limit`, after whatever it sends.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut sink))
        .await
        .is_ok()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn half_sent_requests_and_idle_connections_are_closed_while_the_service_answers(
    pool: PgPool,
) {
    const SLOW_CLIENTS: usize = 1000;
    let app = TestApp::spawn_with(pool, |config| config.http_header_timeout_ms = 2000).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let user = app.new_user().await;
    let order = app.create_widget(&user.access).await;

    // An event stream opened first: its request was read, so the header timeout does not end it.
    let mut events = TcpStream::connect(&addr).await.unwrap();
    events
        .write_all(
            format!(
                "GET /orders/{order}/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
                user.access
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    read_until(&mut events, "\"status\":\"PENDING\"").await;

    // A keep-alive connection that made one request and then sits idle.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(format!("GET /health/live HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until(&mut idle, "200 OK").await;

    // Slow clients: each sends the start of a request line and nothing more.
    let mut slow = Vec::with_capacity(SLOW_CLIENTS);
    for _ in 0..SLOW_CLIENTS {
        let mut client = TcpStream::connect(&addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        slow.push(client);
    }

    // The service answers throughout: the liveness check, and a real request.
    let checks = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/health/live");
        async move {
            for _ in 0..15 {
                let status = client.get(&url).send().await.unwrap().status();
                assert_eq!(status, 200, "/health/live while slow clients wait");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    let mut still_open = 0;
    for client in &mut slow {
        if !closed_within(client, Duration::from_secs(20)).await {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "half-sent requests still open 20 s after a 2 s header timeout"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(10)).await,
        "an idle keep-alive connection was not closed"
    );
    checks.await.unwrap();

    // The stream outlived every timeout, and still delivers.
    let cancelled = app.cancel(&user.access, &order).await;
    assert_eq!(cancelled.status(), 200);
    read_until(&mut events, "\"status\":\"CANCELLED\"").await;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn past_the_connection_limit_new_connections_get_503_and_the_process_survives(pool: PgPool) {
    const LIMIT: usize = 20;
    let app = TestApp::spawn_with(pool, |config| config.max_connections = Some(LIMIT as u32)).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let live = format!("GET /health/live HTTP/1.1\r\nHost: {addr}\r\n\r\n");

    // Every slot taken by a keep-alive connection that made a request (so it was surely accepted) and stays open.
    let mut held = Vec::with_capacity(LIMIT);
    for _ in 0..LIMIT {
        let mut client = TcpStream::connect(&addr).await.unwrap();
        client.write_all(live.as_bytes()).await.unwrap();
        read_until(&mut client, "200 OK").await;
        held.push(client);
    }

    // One more: a clean 503 in the contract's shape, then the connection is closed.
    let refused = reqwest::Client::new()
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(crate::helpers::retry_after(&refused), 1);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Too many connections"),
        "{body}"
    );

    // A flood past the limit: each is refused or closed, and the process goes on.
    let mut flood = Vec::new();
    for _ in 0..500 {
        if let Ok(client) = TcpStream::connect(&addr).await {
            flood.push(client);
        }
    }
    for client in &mut flood {
        assert!(
            closed_within(client, Duration::from_secs(10)).await,
            "a connection past the limit was kept open"
        );
    }
    assert!(app.metric("http_connections_refused_total").await >= 1.0);
    assert!(!app.server.is_finished(), "the server stopped");

    // Slots freed, new connections are served again.
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        let response = reqwest::Client::new()
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "no connection was served once the held ones closed");
}
