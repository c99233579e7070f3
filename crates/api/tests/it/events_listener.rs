//! The live-status listener under the failures a long-lived connection meets: a connection that goes silent
//! without either end being told (a NAT that forgets it, a failover), a listener that cannot get back, and a
//! reconnect with thousands of streams open, all of which must catch up at once without starving the requests.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use api::events::listener::{LISTENER_DOWN_AFTER, PROBE_DEADLINE, PROBE_INTERVAL};
use futures_util::{StreamExt, future::join_all, stream};
use reqwest::{Client, StatusCode, Url};
use serde_json::Value;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::{
    events::listener_pid,
    helpers::{TestApp, database_url_of, json, test_config},
};

/// The longest a change may take to reach a stream when the listener's connection went silent just before it was
/// committed: a probe at most [`PROBE_INTERVAL`] later, its [`PROBE_DEADLINE`], then a new connection and the
/// streams' read of the history, given 3 s here (they take milliseconds; this is a debug build on a busy machine).
fn silent_connection_bound() -> Duration {
    PROBE_INTERVAL + PROBE_DEADLINE + Duration::from_secs(3)
}

/// What the proxy does with the connections made to it from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewConnections {
    Forwarded,
    /// Accepted, held open, and never answered.
    Silenced,
    /// Closed at once, as a server that is down.
    Refused,
}

/// A TCP proxy in front of PostgreSQL that can go silent: it stops forwarding in both directions but keeps every
/// socket open, as a NAT that forgot a connection or a failover leaves it. Neither end is told, so neither end's
/// reads ever return. It can also close its connections, as a restarting server does.
struct Proxy {
    addr: SocketAddr,
    /// Cancelled to silence, or to close, the connections open at that moment.
    open: Arc<Mutex<(CancellationToken, CancellationToken)>>,
    new: Arc<Mutex<NewConnections>>,
    /// Ends every connection (when the test ends, so that its database can be dropped).
    stop: CancellationToken,
}

impl Proxy {
    /// A proxy to `target`, on a free port of 127.0.0.1.
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            open: Arc::default(),
            new: Arc::new(Mutex::new(NewConnections::Forwarded)),
            stop: CancellationToken::new(),
        };
        let (open, new, stop) = (proxy.open.clone(), proxy.new.clone(), proxy.stop.clone());
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap().0,
                };
                let (silenced, closed) =
                    open.lock().unwrap_or_else(PoisonError::into_inner).clone();
                let new = *new.lock().unwrap_or_else(PoisonError::into_inner);
                let stop = stop.clone();
                tokio::spawn(async move {
                    match new {
                        NewConnections::Forwarded => {}
                        NewConnections::Silenced => return stop.cancelled().await,
                        NewConnections::Refused => return,
                    }
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Both sockets stay open, and nothing passes any more.
                        () = silenced.cancelled() => stop.cancelled().await,
                        () = closed.cancelled() => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        proxy
    }

    /// Silences the connections open now.
    fn silence_open_connections(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut open.0).cancel();
    }

    /// Closes the connections open now.
    fn close_open_connections(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut open.1).cancel();
    }

    /// What happens to the connections made from now on.
    fn set_new_connections(&self, new: NewConnections) {
        *self.new.lock().unwrap_or_else(PoisonError::into_inner) = new;
    }

    /// `url` (a PostgreSQL URL) through this proxy.
    fn route(&self, url: &str) -> String {
        let mut url = Url::parse(url).unwrap();
        url.set_host(Some(&self.addr.ip().to_string())).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The PostgreSQL server the tests use (`DATABASE_URL`'s host and port).
fn postgres_addr() -> SocketAddr {
    let url = Url::parse(&std::env::var("DATABASE_URL").unwrap()).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", url.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

/// An app whose live-status listener reaches PostgreSQL through `proxy` (its pool connects directly).
async fn app_listening_through(pool: PgPool, proxy: &Proxy) -> TestApp {
    let listen_url = proxy.route(&database_url_of(&pool));
    TestApp::spawn_with(pool, move |config| {
        config.database_listen_url = Some(listen_url);
    })
    .await
}

/// An open `text/event-stream`, read for the events about given orders.
struct Events {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Events {
    /// Opens `path` (answered 200) with a client without a total timeout, which a stream that stays open would hit.
    async fn open(client: &Client, app: &TestApp, token: &str, path: &str) -> Self {
        let response = client
            .get(app.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// Reads events until one says that `order` is `status`; panics if none does within `wait`, or if the server
    /// ends the stream first.
    async fn expect(&mut self, order: &str, status: &str, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).unwrap();
                let Some(data) = block.lines().find_map(|line| line.strip_prefix("data:")) else {
                    continue; // a heartbeat
                };
                let data: Value = serde_json::from_str(data.trim()).unwrap();
                if data["id"] == order && data["status"] == status {
                    return;
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!("{order} was not {status} on the stream within {wait:?}")
                })
                .unwrap();
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => panic!("the server ended the stream before {order} was {status}"),
            }
        }
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_listener_connection_that_goes_silent_is_replaced_and_the_streams_miss_no_change(
    pool: PgPool,
) {
    let proxy = Proxy::start(postgres_addr()).await;
    let app = app_listening_through(pool, &proxy).await;
    let user = app.new_user().await;
    let mut orders = Vec::new();
    for _ in 0..4 {
        orders.push(app.create_widget(&user.access).await);
    }
    listener_pid(&app.db, None).await;
    let client = Client::new();
    let mut mine = Events::open(&client, &app, &user.access, "/orders/events").await;
    let mut last = Events::open(
        &client,
        &app,
        &user.access,
        &format!("/orders/{}/events", orders[3]),
    )
    .await;
    last.expect(&orders[3], "PENDING", Duration::from_secs(5))
        .await;
    // Through the proxy, live.
    assert_eq!(
        app.cancel(&user.access, &orders[0]).await.status(),
        StatusCode::OK
    );
    mine.expect(&orders[0], "CANCELLED", Duration::from_secs(5))
        .await;
    let reconnects = app.metric("sse_listener_reconnects_total").await;
    let probe_failures = app.metric("sse_listener_probe_failures_total").await;

    proxy.silence_open_connections();
    let silenced = Instant::now();
    // Committed while the listener hears nothing: one through the api, one straight in the database, as another
    // replica or the worker would.
    assert_eq!(
        app.cancel(&user.access, &orders[1]).await.status(),
        StatusCode::OK
    );
    sqlx::query(
        "with cancelled as (
             update orders set status = 'CANCELLED', updated_at = now() where id = $1::uuid returning id
         )
         insert into order_status_history (order_id, status) select id, 'CANCELLED' from cancelled",
    )
    .bind(&orders[3])
    .execute(&app.db)
    .await
    .unwrap();
    let bound = silent_connection_bound();
    mine.expect(&orders[1], "CANCELLED", bound).await;
    mine.expect(&orders[3], "CANCELLED", bound).await;
    last.expect(&orders[3], "CANCELLED", bound).await;
    let recovered = silenced.elapsed();
    assert!(
        app.metric("sse_listener_probe_failures_total").await > probe_failures,
        "the missed probe was not counted"
    );
    assert!(
        app.metric("sse_listener_reconnects_total").await > reconnects,
        "the reconnect was not counted"
    );
    // The new connection carries the next change live.
    assert_eq!(
        app.cancel(&user.access, &orders[2]).await.status(),
        StatusCode::OK
    );
    mine.expect(&orders[2], "CANCELLED", Duration::from_secs(2))
        .await;
    println!("streams caught up {recovered:?} after the listener's connection went silent");
}

/// `GET /health/ready`: its status and body.
async fn readiness(app: &TestApp) -> (StatusCode, Value) {
    let response = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    (response.status(), json(response).await)
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn readiness_fails_while_the_listener_cannot_listen_and_recovers_when_it_does(pool: PgPool) {
    let proxy = Proxy::start(postgres_addr()).await;
    let app = app_listening_through(pool, &proxy).await;
    let user = app.new_user().await;
    let order = app.create_widget(&user.access).await;
    listener_pid(&app.db, None).await;
    let client = Client::new();
    let mut stream = Events::open(&client, &app, &user.access, "/orders/events").await;
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["events"], "ok", "{body}");

    // The open connection goes silent, and so does every new one: the listener cannot listen again.
    proxy.set_new_connections(NewConnections::Silenced);
    proxy.silence_open_connections();
    let silenced = Instant::now();
    let deadline = silenced + LISTENER_DOWN_AFTER + PROBE_INTERVAL + Duration::from_secs(3);
    let body = loop {
        let (status, body) = readiness(&app).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break body;
        }
        assert!(Instant::now() < deadline, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Not before the bound: the last proof that it listened came at most a probe interval before the silence.
    let down_after = silenced.elapsed();
    assert!(
        down_after + PROBE_INTERVAL >= LISTENER_DOWN_AFTER,
        "down after {down_after:?}"
    );
    assert_eq!(body["events"], "down", "{body}");
    assert_eq!(
        (&body["postgres"], &body["redis"]),
        (&"ok".into(), &"ok".into()),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("live order status")),
        "{body}"
    );
    // Changed while nobody listens.
    assert_eq!(
        app.cancel(&user.access, &order).await.status(),
        StatusCode::OK
    );

    proxy.set_new_connections(NewConnections::Forwarded);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readiness(&app).await;
        if status == StatusCode::OK {
            assert_eq!(body["events"], "ok", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "not ready again: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stream
        .expect(&order, "CANCELLED", Duration::from_secs(5))
        .await;
    println!("readiness failed {down_after:?} after the listener lost PostgreSQL");
}

/// Streams open in the catch-up test, and the users holding them (as many streams each).
const STREAMS: usize = 2000;
const USERS: usize = 20;
/// Changes each user's orders go through while the listener is away: every stream reads that many back.
const MISSED_PER_USER: usize = 50;

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn two_thousand_streams_catch_up_after_a_reconnect_while_requests_are_served(pool: PgPool) {
    let started = Instant::now();
    let proxy = Proxy::start(postgres_addr()).await;
    // The pool as the service makes it (10 connections, a 2 s wait for one), shared by requests and streams.
    let config = test_config();
    let db = orders_core::db::pool_options(&config.database)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let listen_url = proxy.route(&database_url_of(&pool));
    let app = TestApp::spawn_with(db, move |config| {
        config.sse_max_streams_per_user = (STREAMS / USERS) as u32;
        config.database_listen_url = Some(listen_url);
    })
    .await;
    // Each user: one order to cancel at the end, and a backlog that changes while the listener is away.
    let mut users = Vec::new();
    for _ in 0..USERS {
        let token = app.new_user().await.access;
        let order = app.create_widget(&token).await;
        users.push((token, order));
    }
    sqlx::query(
        "insert into orders (id, user_id, product_name, amount)
         select gen_random_uuid(), u.id, 'Backlog', 1 from users u cross join generate_series(1, $1)",
    )
    .bind(MISSED_PER_USER as i32)
    .execute(&pool)
    .await
    .unwrap();
    listener_pid(&pool, None).await;

    let client = Client::new();
    let mut streams: Vec<(usize, Events)> = stream::iter(0..STREAMS)
        .map(|n| {
            let (client, app, token) = (&client, &app, &users[n % USERS].0);
            async move {
                (
                    n % USERS,
                    Events::open(client, app, token, "/orders/events").await,
                )
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let opened = started.elapsed();

    // PostgreSQL goes away for the listener (its connection is closed, new ones are refused), and meanwhile each
    // user's backlog is claimed: changes that no stream hears of.
    proxy.set_new_connections(NewConnections::Refused);
    proxy.close_open_connections();
    sqlx::query(
        "with claimed as (
             update orders set status = 'PROCESSING', updated_at = now()
             where product_name = 'Backlog' returning id
         )
         insert into order_status_history (order_id, status) select id, 'PROCESSING' from claimed",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The last of them for each user: its stream has caught up once it has sent that one.
    let last_missed: Vec<String> = join_all(users.iter().map(|(_, order)| {
        sqlx::query_scalar(
            "select h.order_id::text from order_status_history h join orders o on o.id = h.order_id
             where o.user_id = (select user_id from orders where id = $1::uuid)
             order by h.id desc limit 1",
        )
        .bind(order)
        .fetch_one(&pool)
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();

    // The listener gets back: every stream reads what it missed at once, while requests come in.
    proxy.set_new_connections(NewConnections::Forwarded);
    let back = Instant::now();
    let caught_up = CancellationToken::new();
    let requests = async {
        let served = stream::iter(0..8).map(|n| {
            let (app, token, caught_up) = (&app, &users[n % USERS].0, &caught_up);
            async move {
                let mut answers = Vec::new();
                while !caught_up.is_cancelled() {
                    let sent = Instant::now();
                    let status = app.get(token, "/orders/my-orders?limit=5").await.status();
                    answers.push((status, sent.elapsed()));
                }
                answers
            }
        });
        served.buffer_unordered(8).concat().await
    };
    let catch_up = async {
        join_all(streams.iter_mut().map(|(user, events)| {
            events.expect(&last_missed[*user], "PROCESSING", Duration::from_secs(40))
        }))
        .await;
        caught_up.cancel();
        back.elapsed()
    };
    let (answers, caught_up_in) = tokio::join!(requests, catch_up);
    let failed: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status != StatusCode::OK)
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed during the catch-up: {failed:?}"
    );
    let slowest = answers
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();

    // Every stream is still open, and carries the next change of its user.
    for (token, order) in &users {
        assert_eq!(app.cancel(token, order).await.status(), StatusCode::OK);
    }
    let changed = Instant::now();
    join_all(streams.iter_mut().map(|(user, events)| {
        events.expect(&users[*user].1, "CANCELLED", Duration::from_secs(20))
    }))
    .await;
    println!(
        "{STREAMS} streams opened in {opened:?}; caught up on {MISSED_PER_USER} changes each {caught_up_in:?} after \
         the listener got back, while {} requests were answered 200 (slowest {slowest:?}); the next change reached \
         every stream in {:?}; {:?} in all",
        answers.len(),
        changed.elapsed(),
        started.elapsed()
    );
}
