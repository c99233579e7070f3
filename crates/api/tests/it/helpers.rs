use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError, mpsc},
    time::{Duration, Instant},
};

use api::{App, Config, config::RateLimits};
use clap::Parser;
use orders_core::queue;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery staple";

/// The secret the test apps sign their JWTs with, so that a test can sign tokens of its own.
pub const JWT_SECRET: &str = "a test secret that is long enough for HS256!";

/// A running api on a random port with its own queue.
pub struct TestApp {
    pub base: String,
    /// Where `/metrics` is served (its own listener, as METRICS_ADDR sets it).
    pub metrics_base: Option<String>,
    pub client: Client,
    pub db: PgPool,
    pub queue_name: String,
    redis_url: String,
    /// Stops the app when the test ends: its live-status listener holds a connection to the test's database of its
    /// own, which would keep sqlx::test from dropping the database.
    stop: tokio_util::sync::CancellationToken,
    /// The app's task: it ends once the app has stopped.
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A configuration for tests: port 0, no rate limits, a unique queue.
pub fn test_config() -> Config {
    let mut config = Config::parse_from(["api", "--jwt-secret", JWT_SECRET]);
    config.bind_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_addr = "127.0.0.1:0".into();
    config.rate_limits = RateLimits::off();
    config.queue.queue_name = format!("test-{}", Uuid::now_v7());
    config.queue.redis_url = redis_url();
    config
}

impl TestApp {
    pub async fn spawn(db: PgPool) -> Self {
        Self::spawn_with(db, |_| {}).await
    }

    pub async fn spawn_with(db: PgPool, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        adjust(&mut config);
        let queue_name = config.queue.queue_name.clone();
        let redis_url = config.queue.redis_url.clone();
        let queue = queue::order_queue(&config.queue).expect("queue");
        let app = App::build_with(config, db.clone(), queue)
            .await
            .expect("app builds");
        let addr = app.local_addr().expect("bound");
        let metrics_base = app.metrics_addr().map(|addr| format!("http://{addr}"));
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(stop.clone()));
        Self {
            base: format!("http://{addr}"),
            metrics_base,
            client: Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            db,
            queue_name,
            redis_url,
            stop,
            server,
        }
    }

    /// Stops the app as SIGTERM does (`server` ends once it has).
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn register(&self, email: &str) -> Response {
        self.post_json(
            "/auth/register",
            &json!({"name": "Ada", "email": email, "password": PASSWORD}),
        )
        .await
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post_json(
            "/auth/login",
            &json!({"email": email, "password": password}),
        )
        .await
    }

    /// Registers a user and logs in; returns the login body.
    pub async fn new_user(&self) -> Tokens {
        let email = format!("user-{}@example.com", Uuid::new_v4());
        assert_eq!(self.register(&email).await.status(), StatusCode::CREATED);
        let response = self.login(&email, PASSWORD).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("json");
        Tokens {
            access: body["access_token"].as_str().expect("access").to_owned(),
            refresh: body["refresh_token"].as_str().expect("refresh").to_owned(),
        }
    }

    /// Registers a user and gives them `role` (`customer`, `viewer` or `operator`), without logging in.
    pub async fn register_with_role(&self, role: &str) -> Registered {
        let email = format!("{role}-{}@example.com", Uuid::new_v4());
        let registered = self.register(&email).await;
        assert_eq!(registered.status(), StatusCode::CREATED);
        let id = json(registered).await["id"]
            .as_str()
            .expect("id")
            .parse()
            .expect("a UUID");
        self.set_role(&email, role).await;
        Registered { id, email }
    }

    /// Sets the role of the user registered with `email`, straight in the database.
    pub async fn set_role(&self, email: &str, role: &str) {
        sqlx::query("update users set role = $2 where email = $1")
            .bind(email)
            .bind(role)
            .execute(&self.db)
            .await
            .expect("update the role");
    }

    pub async fn refresh(&self, refresh_token: &str) -> Response {
        self.post_json("/auth/refresh", &json!({"refresh_token": refresh_token}))
            .await
    }

    pub async fn create_order(&self, token: &str, body: &Value) -> Response {
        self.client
            .post(self.url("/orders/create"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Creates a small order and returns its id.
    pub async fn create_widget(&self, token: &str) -> String {
        let response = self
            .create_order(token, &json!({"product_name": "Widget", "amount": 19.99}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        json(response).await["id"].as_str().expect("id").to_owned()
    }

    pub async fn get(&self, token: &str, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    /// The OpenAPI document the app serves.
    pub async fn openapi(&self) -> Value {
        json(
            self.client
                .get(self.url("/openapi.json"))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// The text of `GET /metrics`, from the metrics listener.
    pub async fn metrics(&self) -> String {
        let base = self.metrics_base.as_deref().expect("metrics are served");
        let response = self
            .client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("text")
    }

    /// The value of an unlabelled counter (or gauge) on `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let metrics = self.metrics().await;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} is not exported"))
            .parse()
            .expect("a number")
    }

    pub async fn cancel(&self, token: &str, id: &str) -> Response {
        self.client
            .patch(self.url(&format!("/orders/{id}/cancel")))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("select count(*) from {table}");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.db)
            .await
            .expect("count")
    }

    /// The order ids whose jobs are waiting on this app's queue.
    pub fn queued_order_ids(&self) -> Vec<String> {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis url");
        let mut conn = client.get_connection().expect("redis");
        let payloads: Vec<Vec<u8>> = redis::cmd("HVALS")
            .arg(format!("{}:data", self.queue_name))
            .query(&mut conn)
            .expect("hvals");
        payloads
            .iter()
            .map(|p| {
                let job: Value = serde_json::from_slice(p).expect("job json");
                job["order_id"].as_str().expect("order_id").to_owned()
            })
            .collect()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
        delete_queue_keys(&self.redis_url, &self.queue_name);
    }
}

/// Deletes every Redis key of the queue `queue_name` (its jobs, and the rate limits counted under it).
pub fn delete_queue_keys(redis_url: &str, queue_name: &str) {
    let Ok(client) = redis::Client::open(redis_url) else {
        return;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{queue_name}:*"))
        .query(&mut conn)
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
    }
}

/// Forwards each line a child writes to `stream`, from a thread of its own: the test can watch for a line while
/// the child runs, and a pipe nobody reads never fills up and blocks the child.
pub fn forward_lines(stream: impl Read + Send + 'static, lines: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
}

/// A child process that is killed if the test fails before it stops the child itself.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Does nothing once the child has been waited for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address in the api's `listening` line (`LOG_FORMAT=json`), which it logs once bound: with
/// `BIND_ADDR=127.0.0.1:0` the system picks a free port and only the api knows which. Every line read on the
/// way is kept in `logs`.
pub fn listening_address(lines: &mpsc::Receiver<String>, logs: &mut Vec<String>) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|err| {
                panic!(
                    "no `listening` line from the api ({err}); it wrote:\n{}",
                    logs.join("\n")
                )
            });
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
        logs.push(line);
        if event["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening"))
        {
            return event["addr"]
                .as_str()
                .and_then(|addr| addr.parse().ok())
                .unwrap_or_else(|| panic!("no address in {}", logs.last().unwrap()));
        }
    }
}

/// The real `api` binary, on a free port, with its output kept for failure messages.
pub struct ApiProcess {
    pub child: KillOnDrop,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    queue_name: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ApiProcess {
    /// Starts the api on `database_url` (already migrated) with a queue of its own, rate limits off and JSON logs;
    /// `configure` adds or overrides environment variables. Returns once it listens.
    pub fn spawn(database_url: &str, configure: impl FnOnce(&mut Command)) -> Self {
        let queue_name = format!("test-{}", Uuid::now_v7());
        let mut command = Command::new(env!("CARGO_BIN_EXE_api"));
        command
            .env("DATABASE_URL", database_url)
            .env("MIGRATE_ON_START", "false")
            .env("REDIS_URL", redis_url())
            .env("QUEUE_NAME", &queue_name)
            .env("JWT_SECRET", JWT_SECRET)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "off")
            .env("RATE_LIMIT_ENABLED", "false")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = KillOnDrop(command.spawn().expect("the api binary starts"));
        let (sender, lines) = mpsc::channel();
        forward_lines(child.0.stdout.take().unwrap(), sender.clone());
        forward_lines(child.0.stderr.take().unwrap(), sender);
        let mut logs = Vec::new();
        let base = format!("http://{}", listening_address(&lines, &mut logs));
        let logs = Arc::new(Mutex::new(logs));
        // Keep draining its output (a full pipe would block it), kept for failure messages.
        let kept = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in lines {
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        Self {
            child,
            base,
            queue_name,
            logs,
        }
    }

    /// Everything it wrote so far.
    pub fn logs(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    /// A new user registered with `email` and logged in: its access token.
    pub async fn register_and_login(&self, client: &Client, email: &str) -> String {
        let registered = client
            .post(format!("{}/auth/register", self.base))
            .json(&json!({"name": "Ada", "email": email, "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(registered.status(), StatusCode::CREATED, "{}", self.logs());
        let login = client
            .post(format!("{}/auth/login", self.base))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), StatusCode::OK, "{}", self.logs());
        json(login).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl ApiProcess {
    /// Creates an order (a Widget for 1) as the holder of `token`, answered 201: its id.
    pub async fn create_widget(&self, client: &Client, token: &str) -> String {
        let created = client
            .post(format!("{}/orders/create", self.base))
            .bearer_auth(token)
            .json(&json!({"product_name": "Widget", "amount": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), StatusCode::CREATED, "{}", self.logs());
        json(created).await["id"].as_str().unwrap().to_owned()
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        delete_queue_keys(&redis_url(), &self.queue_name);
    }
}

/// A registered user who has not logged in.
pub struct Registered {
    pub id: Uuid,
    pub email: String,
}

pub struct Tokens {
    pub access: String,
    pub refresh: String,
}

pub async fn json(response: Response) -> Value {
    response.json().await.expect("json body")
}

/// Asserts a 422 whose first error is at `loc`.
pub async fn assert_422_at(response: Response, loc: Value) {
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = json(response).await;
    let errors = body["detail"].as_array().expect("detail is a list");
    assert!(
        errors
            .iter()
            .any(|e| e["loc"] == loc && e["msg"].is_string() && e["type"].is_string()),
        "no error at {loc}: {body}"
    );
}

/// The URL of the test's own database, for a spawned process or a configuration.
pub fn database_url_of(db: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for #[sqlx::test]");
    let name = db
        .connect_options()
        .get_database()
        .expect("database name")
        .to_owned();
    let (server, _) = base.rsplit_once('/').expect("URL has a path");
    format!("{server}/{name}")
}

/// The `Retry-After` of a 429, in seconds.
pub fn retry_after(response: &Response) -> u64 {
    response.headers()[reqwest::header::RETRY_AFTER]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("whole seconds")
}
