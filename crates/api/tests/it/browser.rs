//! Real browsers, Debian's chromium headless, driven by playwright-core (`crates/api/tests/browser/`):
//! - Swagger UI used through the page as a newcomer would (`swagger.mjs`);
//! - a page of the api's origin that opens `new EventSource('/orders/<id>/events')` with the `order_events` cookie,
//!   sees the order move, gets the rest after the connection drops mid-way, and stops by itself once the order is
//!   finished (`eventsource.mjs`).
//!
//! Needs `chromium` (or CHROMIUM) and `npm ci` in that folder: `scripts/dev test` and CI install both.

use std::{
    process::Stdio,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use clap::Parser;
use serde_json::Value;
use sqlx::PgPool;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, redis_url};

/// A TCP proxy in front of the api whose open connections the test can cut (as a load balancer or a network
/// would), while new ones still go through.
pub(crate) struct CutProxy {
    pub(crate) base: String,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accepting: AbortHandle,
}

impl CutProxy {
    pub(crate) async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let open = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                open.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(relay.abort_handle());
            }
        })
        .abort_handle();
        Self {
            base,
            connections,
            accepting,
        }
    }

    /// Drops every connection open now: both sockets close.
    pub(crate) fn cut(&self) -> usize {
        let open = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        open.iter().for_each(AbortHandle::abort);
        open.len()
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

/// A worker in this process on the app's queue, polling every 20 ms, with `adjust` applied to its settings.
pub(crate) fn spawn_worker(
    app: &TestApp,
    pool: &PgPool,
    adjust: impl FnOnce(&mut worker::WorkerSettings),
) -> (CancellationToken, JoinHandle<anyhow::Result<()>>) {
    let mut queue = worker::Config::parse_from(["worker"]).queue;
    queue.redis_url = redis_url();
    queue.queue_name = app.queue_name.clone();
    let mut settings = worker::Config::parse_from(["worker"]).worker;
    settings.worker_poll_interval_ms = 20;
    adjust(&mut settings);
    let stop = CancellationToken::new();
    let worker = tokio::spawn(worker::run(settings, queue, pool.clone(), stop.clone()));
    (stop, worker)
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_browser_eventsource_follows_an_order_resumes_after_a_drop_and_stops_by_itself(
    pool: PgPool,
) {
    let app = TestApp::spawn(pool.clone()).await;
    let proxy = CutProxy::start(app.base.trim_start_matches("http://").to_owned()).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    let screenshot = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/browser-eventsource.png"
    );
    let mut node = tokio::process::Command::new("node")
        .arg(format!("{folder}/eventsource.mjs"))
        .args([&proxy.base, &user.access, &id, screenshot])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed (apt-get install nodejs npm)");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the browser's first event within 60 s")
        .unwrap();
    assert_eq!(
        first.as_deref(),
        Some("open"),
        "the browser did not start: is chromium installed, and `npm ci` run in {folder}?"
    );

    // The order moves only now that the page follows it: a worker with 1 s stages.
    let (stop, worker) = spawn_worker(&app, &pool, |settings| {
        settings.order_stage_delay_ms = 1000;
        settings.reconcile_interval_ms = 200;
        settings.reconcile_redeliver_after_ms = 500;
    });
    let order: uuid::Uuid = id.parse().unwrap();
    let status = || async {
        sqlx::query_scalar::<_, String>("select status::text from orders where id = $1")
            .bind(order)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while status().await != "PROCESSING" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the order never became PROCESSING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The PROCESSING event is on its way; then the connection drops, before COMPLETED.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        proxy.cut() >= 1,
        "the stream's connection went through the proxy"
    );

    let last = tokio::time::timeout(Duration::from_secs(90), lines.next_line())
        .await
        .expect("the EventSource stops within 90 s")
        .unwrap()
        .expect("the browser's log");
    let log: Value = serde_json::from_str(&last).unwrap();
    let statuses: Vec<&str> = log["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{log}"))
        .iter()
        .map(|event| event["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["PENDING", "PROCESSING", "COMPLETED"], "{log}");
    // Connected again after the drop, and once more after the order was done: that one got 204 and closed it.
    assert!(log["opens"].as_u64().unwrap() >= 2, "{log}");
    assert_eq!(log["closed"], true, "{log}");
    assert!(node.wait().await.unwrap().success());
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// Swagger UI works for a person: through the page alone, with the examples it fills in, a newcomer registers, logs
/// in, authorizes (which survives a reload), creates an order with the suggested Idempotency-Key (Execute twice:
/// one order), lists it and cancels it while a worker with 30 s stages has not reached it yet. Screenshots of each
/// step: `target/swagger-*.png`.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_newcomer_registers_logs_in_creates_lists_and_cancels_in_swagger_ui(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let (stop, worker) = spawn_worker(&app, &pool, |settings| {
        settings.order_stage_delay_ms = 30_000;
        settings.order_lease_ms = 70_000;
    });

    let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    let screenshots = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target");
    let run = tokio::process::Command::new("node")
        .arg(format!("{folder}/swagger.mjs"))
        .args([&app.base, screenshots])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the page is done within 120 s")
        .expect("node is installed (apt-get install nodejs npm)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "no result from the browser: is chromium installed, and `npm ci` run in {folder}?\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(log.get("error").is_none(), "{log}");
    let steps: Vec<(&str, u64)> = log["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| {
            (
                step["step"].as_str().unwrap(),
                step["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("register", 201),
            ("login", 200),
            ("create", 201),
            ("create-again", 200),
            ("list", 200),
            ("cancel", 200),
        ],
        "{log}"
    );
    assert_eq!(log["authorized_after_reload"], true, "{log}");
    assert_eq!(log["created_twice_same"], true, "{log}");
    let key = log["idempotency_key"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(key).is_ok(), "suggested key {key}");
    let id: uuid::Uuid = log["order_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(log["listed"], serde_json::json!([id.to_string()]), "{log}");
    assert_eq!(log["cancelled_status"], "CANCELLED", "{log}");

    // What the page did is what the database holds: one order, cancelled, under the example's account.
    let orders: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
        "select o.id, o.status::text, u.email from orders o join users u on u.id = o.user_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        orders,
        [(id, "CANCELLED".to_owned(), "grace@example.com".to_owned())]
    );
    stop.cancel();
    worker.await.unwrap().unwrap();
}
