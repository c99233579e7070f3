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
