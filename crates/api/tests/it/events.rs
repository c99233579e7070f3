//! Live order status over server-sent events, through the real HTTP API, with the in-process worker moving the
//! orders and PostgreSQL's notifications carrying the changes.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, json};

pub fn with_worker(stage_delay_ms: u64) -> impl Fn(&mut api::Config) + Clone {
    move |config| {
        config.with_worker = true;
        config.worker.order_stage_delay_ms = stage_delay_ms;
        config.worker.worker_poll_interval_ms = 20;
        config.worker.reconcile_interval_ms = 500;
    }
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

impl SseEvent {
    pub fn status(&self) -> &str {
        self.data["status"].as_str().unwrap_or_default()
    }
}

/// An open `text/event-stream` response, read event by event.
pub struct Stream {
    pub response: reqwest::Response,
    buffer: Vec<u8>,
    comments: usize,
}

impl Stream {
    pub async fn open(
        app: &TestApp,
        token: &str,
        path: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        // A client of its own: the app's has a total timeout, which a stream that stays open would hit.
        let mut request = reqwest::Client::new().get(app.url(path)).bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send().await.unwrap()
    }

    pub async fn start(
        app: &TestApp,
        token: &str,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let response = Self::open(app, token, path, last_event_id).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        Self::from_response(response)
    }

    /// Reads the `text/event-stream` of `response`.
    pub fn from_response(response: reqwest::Response) -> Self {
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        Self {
            response,
            buffer: Vec::new(),
            comments: 0,
        }
    }

    /// The next event; `None` when the server ended the stream. Panics after `wait` without one.
    pub async fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                // Whole events only: a chunk may end inside a character.
                let block = String::from_utf8(self.buffer.drain(..end + 2).collect()).unwrap();
                let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                return Some(SseEvent {
                    event,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("no event in time")
                .unwrap();
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => return None,
            }
        }
    }

    /// Reads until the server ends the stream, however many events come first; how long that took. Fails after 30 s
    /// (`why` says what should have ended it), rather than waiting for as long as the stream could last.
    pub async fn time_to_end(&mut self, why: &str) -> Duration {
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(30), async {
            while self.next(Duration::from_secs(10)).await.is_some() {}
        })
        .await
        .unwrap_or_else(|_| panic!("the stream outlived {why}"));
        started.elapsed()
    }

    /// Every event until the server ends the stream.
    pub async fn rest(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next(Duration::from_secs(20)).await {
            events.push(event);
        }
        events
    }
}

pub fn statuses(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(SseEvent::status).collect()
}

async fn create(app: &TestApp, token: &str) -> String {
    app.create_widget(token).await
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_order_stream_shows_pending_processing_completed_then_ends(pool: PgPool) {
    let app = TestApp::spawn_with(pool, with_worker(300)).await;
    let user = app.new_user().await;
    let id = create(&app, &user.access).await;
    let mut stream = Stream::start(&app, &user.access, &format!("/orders/{id}/events"), None).await;
    // The headers the response's map is sized for (`routes::events::sse`), besides those hyper writes itself.
    let mut names: Vec<&str> = stream
        .response
        .headers()
        .keys()
        .map(|name| name.as_str())
        .filter(|name| !matches!(*name, "date" | "transfer-encoding"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["cache-control", "content-type", "x-request-id"]);
    let events = stream.rest().await;
    // Opened right after the create: the worker may have claimed it already, never completed it (two 300 ms stages).
    let seen = statuses(&events);
    assert!(
        seen == ["PENDING", "PROCESSING", "COMPLETED"] || seen == ["PROCESSING", "COMPLETED"],
        "{seen:?}"
    );
    for event in &events {
        assert_eq!(event.event, "status");
        assert_eq!(event.data["id"], id.as_str());
        assert_eq!(event.data["product_name"], "Widget");
    }
    // Ids grow; each live one is the change's row in order_status_history.
    let ids: Vec<i64> = events.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let history: Vec<(i64, String)> = sqlx::query_as(
        "select id, status::text from order_status_history where order_id = $1::uuid order by id",
    )
    .bind(&id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    let live: Vec<(i64, String)> = events
        .iter()
        .filter(|e| e.status() != "PENDING")
        .map(|e| (e.id.parse().unwrap(), e.status().to_owned()))
        .collect();
    assert_eq!(live, history);
    // The last event is the order as GET shows it.
    let now = json(app.get(&user.access, &format!("/orders/{id}")).await).await;
    assert_eq!(events.last().unwrap().data, now);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_cancel_shows_on_the_stream_and_ends_it(pool: PgPool) {
    // No worker: the order stays PENDING until its owner cancels it.
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = create(&app, &user.access).await;
    let mut stream = Stream::start(&app, &user.access, &format!("/orders/{id}/events"), None).await;
    let first = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!((first.status(), first.id.as_str()), ("PENDING", "0"));
    assert_eq!(app.cancel(&user.access, &id).await.status(), StatusCode::OK);
    let rest = stream.rest().await;
    assert_eq!(statuses(&rest), ["CANCELLED"]);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn reconnecting_with_last_event_id_sends_only_what_was_missed(pool: PgPool) {
    let app = TestApp::spawn_with(pool, with_worker(400)).await;
    let user = app.new_user().await;
    let id = create(&app, &user.access).await;
    let path = format!("/orders/{id}/events");
    let mut stream = Stream::start(&app, &user.access, &path, None).await;
    let processing = loop {
        let event = stream.next(Duration::from_secs(10)).await.unwrap();
        if event.status() == "PROCESSING" {
            break event;
        }
    };
    drop(stream);
    let mut resumed = Stream::start(&app, &user.access, &path, Some(&processing.id)).await;
    assert_eq!(statuses(&resumed.rest().await), ["COMPLETED"]);
    // Resuming after the last event of a finished order: nothing more, `204` (which stops an EventSource).
    let last: i64 =
        sqlx::query_scalar("select max(id) from order_status_history where order_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let done = Stream::open(&app, &user.access, &path, Some(&last.to_string())).await;
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    // From 0: the whole history, once.
    let mut all = Stream::start(&app, &user.access, &path, Some("0")).await;
    assert_eq!(statuses(&all.rest().await), ["PROCESSING", "COMPLETED"]);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn another_users_order_or_a_missing_one_is_404_and_a_bad_last_event_id_422(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.new_user().await;
    let other = app.new_user().await;
    let id = create(&app, &owner.access).await;
    for (token, path) in [
        (&other.access, format!("/orders/{id}/events")),
        (
            &owner.access,
            format!("/orders/{}/events", uuid::Uuid::now_v7()),
        ),
    ] {
        let response = Stream::open(&app, token, &path, None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(json(response).await, json!({"detail": "Order not found"}));
    }
    let response = Stream::open(
        &app,
        &owner.access,
        &format!("/orders/{id}/events"),
        Some("-3"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let unauthenticated = app
        .client
        .get(app.url("/orders/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
}

/// The `Last-Event-ID` that `/openapi.json` documents and the one the streams accept are the same: the smallest id
/// the schema allows opens the stream, one below it (which no stream ever sent, and so no `EventSource` sends) and a
/// value that is no whole number are 422 in the contract's shape.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_streams_accept_exactly_the_last_event_ids_the_schema_allows(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = create(&app, &user.access).await;
    let document = app.openapi().await;
    for (template, path) in [
        ("/orders/{id}/events", format!("/orders/{id}/events")),
        ("/orders/events", "/orders/events".to_owned()),
    ] {
        let parameters = document["paths"][template]["get"]["parameters"]
            .as_array()
            .unwrap();
        let schema = &parameters
            .iter()
            .find(|parameter| parameter["name"] == "Last-Event-ID")
            .unwrap()["schema"];
        assert_eq!(
            (&schema["type"], &schema["format"]),
            (&json!("integer"), &json!("int64")),
            "{template}: {schema}"
        );
        let minimum = schema["minimum"].as_i64().unwrap();
        assert_eq!(minimum, 0, "{template}");

        let accepted = Stream::open(&app, &user.access, &path, Some(&minimum.to_string())).await;
        assert_eq!(accepted.status(), StatusCode::OK, "{path}");
        drop(accepted);
        for refused in [
            (minimum - 1).to_string(),
            "-8432".to_owned(),
            "null".to_owned(),
            "1.5".to_owned(),
            "9223372036854775808".to_owned(),
        ] {
            let response = Stream::open(&app, &user.access, &path, Some(&refused)).await;
            assert_eq!(
                response.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{path} with {refused}"
            );
            let body = json(response).await;
            assert_eq!(
                body["detail"][0]["loc"],
                json!(["header", "Last-Event-ID"]),
                "{body}"
            );
        }
    }
}

/// With `SSE_MAX_STREAM_SECONDS`, a stream that would stay open (an order nobody processes, the stream of all my
/// orders) ends by itself after that long, as a whole response (not broken off), and a reconnect with
/// `Last-Event-ID` loses nothing.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_bounded_stream_ends_cleanly_after_its_lifetime_and_resumes_without_loss(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.sse_max_stream_seconds = Some(1)).await;
    let user = app.new_user().await;
    let id = create(&app, &user.access).await;
    let path = format!("/orders/{id}/events");
    for path in [path.as_str(), "/orders/events"] {
        let started = std::time::Instant::now();
        let mut stream = Stream::start(&app, &user.access, path, None).await;
        // `rest` fails the test on a body broken off, or on one still open after 20 s.
        let events = stream.rest().await;
        let lasted = started.elapsed();
        assert!(
            (Duration::from_millis(900)..Duration::from_secs(5)).contains(&lasted),
            "{path} lasted {lasted:?}"
        );
        if path == "/orders/events" {
            assert!(events.is_empty(), "{events:?}");
        } else {
            assert_eq!(statuses(&events), ["PENDING"]);
        }
    }
    // The order changes while no stream is open: the reconnect gets the change, and the stream ends with it.
    assert_eq!(app.cancel(&user.access, &id).await.status(), StatusCode::OK);
    let mut again = Stream::start(&app, &user.access, &path, Some("0")).await;
    assert_eq!(statuses(&again.rest().await), ["CANCELLED"]);
    let mut mine = Stream::start(&app, &user.access, "/orders/events", Some("0")).await;
    assert_eq!(statuses(&mine.rest().await), ["CANCELLED"]);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_eleventh_stream_of_a_user_is_429_and_a_closed_one_frees_its_slot(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let other = app.new_user().await;
    let id = create(&app, &user.access).await;
    let path = format!("/orders/{id}/events");
    let mut open = Vec::new();
    for i in 0..10 {
        let path = if i % 2 == 0 {
            path.as_str()
        } else {
            "/orders/events"
        };
        open.push(Stream::start(&app, &user.access, path, None).await);
    }
    let refused = Stream::open(&app, &user.access, "/orders/events", None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(
        json(refused).await["detail"],
        "Too many open event streams: at most 10 per user. Close one first."
    );
    // Another user is not affected.
    let _theirs = Stream::start(&app, &other.access, "/orders/events", None).await;
    // Closing one frees a slot (the server notices when it next writes: the heartbeat, or here a change).
    drop(open.pop());
    assert_eq!(app.cancel(&user.access, &id).await.status(), StatusCode::OK);
    let mut reopened = None;
    for _ in 0..50 {
        let response = Stream::open(&app, &user.access, "/orders/events", None).await;
        if response.status() == StatusCode::OK {
            reopened = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reopened.is_some(),
        "the closed stream's slot was never freed"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_stream_of_all_my_orders_carries_each_change_of_mine_only(pool: PgPool) {
    let app = TestApp::spawn_with(pool, with_worker(100)).await;
    let user = app.new_user().await;
    let other = app.new_user().await;
    let mut stream = Stream::start(&app, &user.access, "/orders/events", None).await;
    let mine = [
        create(&app, &user.access).await,
        create(&app, &user.access).await,
    ];
    let _theirs = create(&app, &other.access).await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = stream.next(Duration::from_secs(20)).await.unwrap();
        seen.push((
            event.data["id"].as_str().unwrap().to_owned(),
            event.status().to_owned(),
        ));
    }
    for id in &mine {
        let of_it: Vec<&str> = seen
            .iter()
            .filter(|(o, _)| o == id)
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(of_it, ["PROCESSING", "COMPLETED"], "{seen:?}");
    }
    // Nothing of the other user's order, and no duplicate later.
    let extra = tokio::time::timeout(
        Duration::from_millis(700),
        stream.next(Duration::from_secs(1)),
    )
    .await;
    assert!(extra.is_err(), "unexpected event: {extra:?}");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_change_made_through_one_api_reaches_a_stream_on_another(pool: PgPool) {
    // Two api processes' worth of apps on one database: the stream on `b`, the change (a cancel) through `a`.
    let a = TestApp::spawn(pool.clone()).await;
    let b = TestApp::spawn(pool).await;
    let user = a.new_user().await;
    let id = create(&a, &user.access).await;
    let mut stream = Stream::start(&b, &user.access, &format!("/orders/{id}/events"), None).await;
    assert_eq!(
        stream.next(Duration::from_secs(5)).await.unwrap().status(),
        "PENDING"
    );
    assert_eq!(a.cancel(&user.access, &id).await.status(), StatusCode::OK);
    assert_eq!(statuses(&stream.rest().await), ["CANCELLED"]);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_change_made_while_the_listener_is_down_still_reaches_the_stream(pool: PgPool) {
    // No worker: the only change is the owner's cancel, made while the api's listener cannot be connected.
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = create(&app, &user.access).await;
    let mut stream = Stream::start(&app, &user.access, &format!("/orders/{id}/events"), None).await;
    assert_eq!(
        stream.next(Duration::from_secs(5)).await.unwrap().status(),
        "PENDING"
    );
    // Run from the maintenance database: a database cannot refuse connections from inside itself.
    let db: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect(&std::env::var("DATABASE_URL").unwrap())
        .await
        .unwrap();
    let allow_connections = |allow: bool| {
        let (admin, db) = (admin.clone(), db.clone());
        async move {
            let sql = format!(r#"alter database "{db}" allow_connections {allow}"#);
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .unwrap();
        }
    };
    // The requests below must find an open connection in the pool: warm it (the api's own periodic reads, such as
    // the check of its streams' sessions, may hold one at that moment).
    let warm = join_all((0..4).map(|_| app.db.acquire())).await;
    drop(warm);
    // New connections to this database are refused (the pool's open ones stay), then the api's LISTEN connection
    // (the one waiting on the order_events channel) is terminated: its reconnects fail for now.
    allow_connections(false).await;
    let killed: i64 = sqlx::query_scalar(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity
         where datname = current_database() and query like 'LISTEN%order_events%'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the listener's connection was not found");
    // The change is announced while nobody listens: that notification is gone for good.
    let cancelled = app.cancel(&user.access, &id).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    allow_connections(true).await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    // Once the listener is back, the stream reads the change from the history.
    let rest = stream.rest().await;
    assert_eq!(statuses(&rest), ["CANCELLED"]);
    let history_id: i64 =
        sqlx::query_scalar("select id from order_status_history where order_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(rest[0].id, history_id.to_string());
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn after_the_listener_reconnects_a_users_stream_sends_no_change_twice(pool: PgPool) {
    // No worker: the changes are the owner's cancels. The first is sent live; then the listener reconnects and the
    // stream reads the history back from where it started, which holds that cancel again.
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let (first, second) = (
        create(&app, &user.access).await,
        create(&app, &user.access).await,
    );
    // The listener is up (and has had the streams catch up) before the stream opens: the first cancel comes live.
    let listening = listener_pid(&app.db, None).await;
    let mut stream = Stream::start(&app, &user.access, "/orders/events", None).await;
    assert_eq!(
        app.cancel(&user.access, &first).await.status(),
        StatusCode::OK
    );
    let live = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (live.data["id"].as_str(), live.status()),
        (Some(first.as_str()), "CANCELLED")
    );

    sqlx::query("select pg_terminate_backend($1)")
        .bind(listening)
        .execute(&app.db)
        .await
        .unwrap();
    listener_pid(&app.db, Some(listening)).await;
    // Time for the catch-up's read, which would bring the first cancel back.
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        app.cancel(&user.access, &second).await.status(),
        StatusCode::OK
    );
    let next = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (next.data["id"].as_str(), next.status()),
        (Some(second.as_str()), "CANCELLED"),
        "a change sent before the reconnect came again"
    );
    let extra = tokio::time::timeout(
        Duration::from_millis(500),
        stream.next(Duration::from_secs(1)),
    )
    .await;
    assert!(extra.is_err(), "unexpected event: {extra:?}");
}

/// The backend pid of the api's `LISTEN order_events` connection (this test's database is its own), once there
/// is one and it is not `not`.
pub async fn listener_pid(db: &PgPool, not: Option<i32>) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = sqlx::query_scalar(
            "select pid from pg_stat_activity
             where datname = current_database() and query like 'LISTEN%order_events%'",
        )
        .fetch_all(db)
        .await
        .unwrap();
        if let [pid] = pids[..]
            && Some(pid) != not
        {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no listener (other than {not:?}): {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn sigterm_ends_the_open_streams_and_the_api_exits(pool: PgPool) {
    use crate::helpers::{ApiProcess, database_url_of};

    let mut api = ApiProcess::spawn(&database_url_of(&pool), |_| {});
    let base = api.base.clone();
    let client = reqwest::Client::new();
    let token = api.register_and_login(&client, "sse@example.com").await;
    let id = api.create_widget(&client, &token).await;
    // Two streams that would stay open for good: a PENDING order with no worker, and all my orders.
    let mut streams = Vec::new();
    for path in [format!("/orders/{id}/events"), "/orders/events".to_owned()] {
        let response = client
            .get(format!("{base}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        streams.push(response);
    }
    let first = streams[0].chunk().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("PENDING"));

    let sent = std::process::Command::new("kill")
        .args(["-TERM", &api.child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // Each stream ends (its body finishes) rather than being cut, and the process exits on its own, well before
    // the 15 s heartbeat or any client would have closed them.
    for stream in &mut streams {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while stream.chunk().await.unwrap().is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "a stream stayed open after SIGTERM");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = api.child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the api did not exit after SIGTERM with streams open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_batch_of_changes_too_large_for_one_notification_arrives_whole_and_in_order(
    pool: PgPool,
) {
    // No worker: the batch is made here, one statement claiming 40 orders as the worker's batches do. Their long
    // names (quotes and two-byte characters included) make about 24 KB of changes, more than one notification
    // may carry, so the trigger splits them.
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let mut stream = Stream::start(&app, &user.access, "/orders/events", None).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let name = format!("Widget \"{i}\" {}", "é".repeat(180));
        let response = app
            .create_order(
                &user.access,
                &json!({"product_name": name, "amount": 19.90}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        ids.push(json(response).await["id"].as_str().unwrap().to_owned());
    }
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db)
        .await
        .unwrap();
    listener.listen("order_events").await.unwrap();
    claim_all(&app, &ids).await;
    // What the trigger sent: all 40 changes, split over several notifications, each under PostgreSQL's limit.
    let mut sizes = Vec::new();
    let mut announced = 0;
    while announced < 40 {
        let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("the changes were not all announced")
            .unwrap();
        sizes.push(notification.payload().len());
        announced += orders_core::db::events::StatusChange::parse(notification.payload())
            .unwrap()
            .len();
    }
    assert_eq!(announced, 40);
    assert!(sizes.len() > 1, "{sizes:?}");
    assert!(sizes.iter().all(|&size| size < 8000), "{sizes:?}");

    for event in expect_each_processing_once(&mut stream, &ids).await {
        assert!(
            event.data["product_name"]
                .as_str()
                .unwrap()
                .ends_with(&"é".repeat(180))
        );
        assert_eq!(event.data["amount"], json!(19.9));
    }
}

/// Creates `count` orders of `token`'s user, 50 at a time, and claims them all for processing in one statement, as
/// the worker's batches do (no worker runs): `count` PROCESSING changes, announced together. Their ids.
async fn create_and_claim(app: &TestApp, token: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < count {
        let batch = (count - ids.len()).min(50);
        ids.extend(join_all((0..batch).map(|_| create(app, token))).await);
    }
    claim_all(app, &ids).await;
    ids
}

/// Claims the orders `ids` for processing in one statement, as the worker's batches do.
async fn claim_all(app: &TestApp, ids: &[String]) {
    let attempts: Vec<_> = ids
        .iter()
        .map(|id| orders_core::db::orders::Attempt {
            id: orders_core::domain::OrderId(id.parse().unwrap()),
            token: format!("test-{id}"),
        })
        .collect();
    let claimed = orders_core::db::orders::claim_for_processing(
        &app.db,
        &attempts,
        Duration::from_secs(60),
        5,
    )
    .await
    .unwrap();
    assert_eq!(claimed.len(), ids.len());
}

/// Reads `ids.len()` events, checks they are the PROCESSING of each of those orders once, in the order of the
/// changes, and that nothing follows; returns them.
async fn expect_each_processing_once(stream: &mut Stream, ids: &[String]) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    while seen.len() < ids.len() {
        seen.push(stream.next(Duration::from_secs(10)).await.unwrap());
    }
    let event_ids: Vec<i64> = seen.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(
        event_ids.windows(2).all(|w| w[0] < w[1]),
        "out of order, or twice: {event_ids:?}"
    );
    let mut orders: Vec<&str> = seen
        .iter()
        .map(|e| e.data["id"].as_str().unwrap())
        .collect();
    orders.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(orders, expected, "each order once");
    assert!(seen.iter().all(|event| event.status() == "PROCESSING"));
    let extra = tokio::time::timeout(
        Duration::from_millis(500),
        stream.next(Duration::from_secs(1)),
    )
    .await;
    assert!(extra.is_err(), "unexpected event: {extra:?}");
    seen
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn reconnecting_after_more_changes_than_one_history_read_gets_them_all_once_in_order(
    pool: PgPool,
) {
    // More changes than one read of the history returns: the stream reads the rest itself while it is sent.
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let count = orders_core::db::events::USER_CHANGES_PAGE as usize + 20;
    let ids = create_and_claim(&app, &user.access, count).await;
    let mut stream = Stream::start(&app, &user.access, "/orders/events", Some("0")).await;
    expect_each_processing_once(&mut stream, &ids).await;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_burst_of_changes_far_beyond_a_streams_inbox_arrives_whole_once_in_order(pool: PgPool) {
    // 1,100 changes at once: far more than a stream holds (64), so it catches up from the history, and more than
    // it remembers having sent (1,024), so it reads the history to forget them while the burst goes on.
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let mut stream = Stream::start(&app, &user.access, "/orders/events", None).await;
    let ids = create_and_claim(&app, &user.access, 1_100).await;
    expect_each_processing_once(&mut stream, &ids).await;
}

/// Opens `/orders/events` until one is refused or `tries` (100 ms apart) have passed; the status of the last.
async fn open_until_ok(app: &TestApp, token: &str, tries: usize) -> (StatusCode, Option<Stream>) {
    let mut status = StatusCode::TOO_MANY_REQUESTS;
    for _ in 0..tries {
        let response = Stream::open(app, token, "/orders/events", None).await;
        status = response.status();
        if status == StatusCode::OK {
            return (
                status,
                Some(Stream {
                    response,
                    buffer: Vec::new(),
                    comments: 0,
                }),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (status, None)
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_users_streams_count_over_every_api_process(pool: PgPool) {
    // Two api processes' worth of apps sharing one Redis and one QUEUE_NAME, as replicas do.
    let a = TestApp::spawn(pool.clone()).await;
    let queue_name = a.queue_name.clone();
    let b = TestApp::spawn_with(pool, move |config| config.queue.queue_name = queue_name).await;
    let user = a.new_user().await;
    let mut open = Vec::new();
    for i in 0..10 {
        let app = if i % 2 == 0 { &a } else { &b };
        open.push(Stream::start(app, &user.access, "/orders/events", None).await);
    }
    for app in [&a, &b] {
        let refused = Stream::open(app, &user.access, "/orders/events", None).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            json(refused).await["detail"],
            "Too many open event streams: at most 10 per user. Close one first."
        );
    }
    // A stream closed on `b` frees a slot for `a`.
    drop(open.pop());
    let (status, reopened) = open_until_ok(&a, &user.access, 50).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the slot closed on another process was never freed"
    );
    open.extend(reopened);
    assert_eq!(
        Stream::open(&b, &user.access, "/orders/events", None)
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_streams_of_a_process_that_died_stop_counting_when_their_lease_ends(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let user_id: String = sqlx::query_scalar("select id::text from users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let key = format!("{}:sse:{user_id}", app.queue_name);
    let client = redis::Client::open(crate::helpers::redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    // Ten streams of a dead process: their leases ended long ago.
    let far_future = 4_000_000_000_000_u64; // milliseconds: the year 2096
    for n in 0..10 {
        let _: () = redis::cmd("ZADD")
            .arg(&key)
            .arg(1)
            .arg(format!("dead-process:{n}"))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let mine = Stream::start(&app, &user.access, "/orders/events", None).await;
    // Nine of another live process: with this one, the user has ten.
    for n in 0..9 {
        let _: () = redis::cmd("ZADD")
            .arg(&key)
            .arg(far_future)
            .arg(format!("live-process:{n}"))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    assert_eq!(
        Stream::open(&app, &user.access, "/orders/events", None)
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let counted: u64 = redis::cmd("ZCARD")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(counted, 10, "the dead process's streams still count");
    drop(mine);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn with_redis_unreachable_each_process_still_holds_its_own_count(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        // Nothing listens there: every shared decision fails, and the process's own count decides.
        config.queue.redis_url = "redis://127.0.0.1:9/0".into();
    })
    .await;
    let user = app.new_user().await;
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(Stream::start(&app, &user.access, "/orders/events", None).await);
    }
    assert_eq!(
        Stream::open(&app, &user.access, "/orders/events", None)
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let local = app.metric("sse_local_decisions_total").await;
    assert!(local >= 10.0, "{local}");
}
