//! The issue "Scale out", as ops run it: several `api` and `worker` processes (the real binaries) on one
//! database and one queue. Orders created through either api are completed exactly once while a worker is
//! killed and an api is restarted under load, and the login limits hold across api processes.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream};
use reqwest::{Client, Response, StatusCode, header};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::helpers::{
    JWT_SECRET, PASSWORD, database_url_of, delete_queue_keys, redis_url, retry_after,
};

/// Orders created in the first test...
const ORDERS: usize = 1000;
/// ...and how many creates are in flight at once.
const IN_FLIGHT: usize = 16;
/// After this many creates have been answered, a worker is killed and an api stopped...
const CHAOS_AFTER: usize = 300;
/// ...creates from this one on wait until that api is down (so some are sent to it and must be retried)...
const WHILE_DOWN_FROM: usize = 350;
/// ...and creates from this one on wait until it is back (so the restarted api serves some).
const AFTER_RESTART_FROM: usize = 650;

/// Jobs one worker process runs at once: also the most orders a killed worker can hold, so the most orders that
/// may have to be taken over.
const WORKER_CONCURRENCY: usize = 32;

/// The api's settings for the orders test: no rate limits (1,000 creates from one client).
const UNLIMITED: &[(&str, &str)] = &[("RATE_LIMIT_ENABLED", "false")];

/// The api's settings for the login test: the default limits, counted in Redis, behind one trusted proxy (so a
/// test can speak for many clients through `X-Forwarded-For`).
const LIMITED: &[(&str, &str)] = &[
    ("RATE_LIMIT_ENABLED", "true"),
    ("RATE_LIMIT_SHARED", "true"),
    ("TRUST_PROXY_HOPS", "1"),
];

/// The workers' settings: short stages, and a lease, heartbeat and reconciler short enough that a killed
/// worker's orders are taken over within seconds (lease 3 s; its jobs come back after 3 missed heartbeats).
///
/// Not a shorter heartbeat: apalis-redis scores heartbeats in whole seconds and truncates 3 missed heartbeats to
/// whole seconds too, so with 500 ms (1.5 s, taken as 1 s) live workers are declared dead right after a second
/// boundary, and their consumers restart, dropping the jobs they run (this test caught that).
const WORKER_SETTINGS: &[(&str, &str)] = &[
    ("ORDER_STAGE_DELAY_MS", "50"),
    ("ORDER_LEASE_MS", "3000"),
    ("WORKER_HEARTBEAT_MS", "1000"),
    ("WORKER_POLL_INTERVAL_MS", "20"),
    ("RECONCILE_INTERVAL_MS", "500"),
    ("RECONCILE_REDELIVER_AFTER_MS", "2000"),
    ("WORKER_METRICS_ADDR", "off"),
    ("RUST_LOG", "warn"),
];

/// The `worker` binary, beside the `api` one. It is not a binary of this package, so `cargo test -p api` does
/// not build it (`scripts/dev test` builds the whole workspace, and with it this binary): when it is missing it
/// is built here, in the same profile.
fn worker_binary() -> PathBuf {
    let api = Path::new(env!("CARGO_BIN_EXE_api"));
    let worker = api.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if worker.exists() {
        return worker;
    }
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "-p", "worker", "--bin", "worker"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if api.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        build.arg("--release");
    }
    let status = build
        .status()
        .unwrap_or_else(|err| panic!("cannot run cargo to build the worker binary: {err}"));
    assert!(
        status.success(),
        "`cargo build -p worker --bin worker` failed ({status}); this test needs {}",
        worker.display()
    );
    assert!(
        worker.exists(),
        "`cargo build -p worker --bin worker` succeeded, yet {} is missing",
        worker.display()
    );
    worker
}

/// The processes of one test, all on the test's database and one queue of its own. When dropped (at the end of
/// the test, or when an assertion fails) it kills them, prints what they wrote if the test failed, and deletes
/// the queue's Redis keys.
struct Fleet {
    database_url: String,
    queue_name: String,
    children: Vec<Child>,
    /// Every line the processes wrote, prefixed with their label.
    logs: Arc<Mutex<Vec<String>>>,
}

/// A running `api` process.
struct Api {
    label: String,
    base: String,
    process: usize,
}

/// A running `worker` process, known in the database by its claims' tokens: `worker-<pid>-...`.
struct Worker {
    pid: u32,
    process: usize,
}

impl Worker {
    /// A `LIKE` pattern for the tokens of this process's claims (`order_status_history.changed_by`).
    fn claims(&self) -> String {
        format!("worker-{}-%", self.pid)
    }
}

impl Fleet {
    fn new(db: &PgPool) -> Self {
        Self {
            database_url: database_url_of(db),
            queue_name: format!("scale-{}", Uuid::now_v7()),
            children: Vec::new(),
            logs: Arc::default(),
        }
    }

    /// Starts `program` with the fleet's database and queue and `env`; returns its index in the fleet and a
    /// channel of the lines it writes.
    fn spawn(
        &mut self,
        label: &str,
        program: &Path,
        env: &[(&str, &str)],
    ) -> (usize, mpsc::Receiver<String>) {
        let mut child = Command::new(program)
            // Away from the repository, so that a developer's `.env` cannot change the settings below.
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", redis_url())
            .env("QUEUE_NAME", &self.queue_name)
            // The test's database is migrated already.
            .env("MIGRATE_ON_START", "false")
            // Seven processes of a test on one server: 5 connections each are plenty.
            .env("DATABASE_MAX_CONNECTIONS", "5")
            .env("LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", program.display()));
        let (sender, lines) = mpsc::channel();
        self.forward(label, child.stdout.take().unwrap(), sender.clone());
        self.forward(label, child.stderr.take().unwrap(), sender);
        self.children.push(child);
        (self.children.len() - 1, lines)
    }

    /// Keeps each line `stream` carries, and passes it on to `lines`, from a thread of its own: a pipe nobody
    /// reads would fill up and block the process.
    fn forward(
        &self,
        label: &str,
        stream: impl Read + Send + 'static,
        lines: mpsc::Sender<String>,
    ) {
        let label = label.to_owned();
        let logs = Arc::clone(&self.logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                logs.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(format!("[{label}] {line}"));
                // Nobody listens once the api's address is known: the line is kept all the same.
                let _ = lines.send(line);
            }
        });
    }

    /// Starts an `api` process without a worker of its own, and waits until it listens.
    async fn spawn_api(&mut self, label: &str, env: &[(&str, &str)]) -> Api {
        let mut settings = vec![
            ("JWT_SECRET", JWT_SECRET),
            ("BIND_ADDR", "127.0.0.1:0"),
            ("METRICS_ADDR", "off"),
            ("WITH_WORKER", "false"),
            // Only the line with the address; warnings and errors too, for the dump of a failed test.
            ("RUST_LOG", "warn,api::startup=info"),
        ];
        settings.extend_from_slice(env);
        let (process, lines) = self.spawn(label, Path::new(env!("CARGO_BIN_EXE_api")), &settings);
        let base = format!("http://{}", self.listening_address(label, &lines).await);
        Api {
            label: label.to_owned(),
            base,
            process,
        }
    }

    /// The address in the api's `listening` line (`LOG_FORMAT=json`), which it logs once bound: with
    /// `BIND_ADDR=127.0.0.1:0` only the api knows its port. Waits without blocking the runtime, since requests
    /// to the other processes go on meanwhile.
    async fn listening_address(&self, label: &str, lines: &mpsc::Receiver<String>) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match lines.try_recv() {
                Ok(line) => {
                    let event: Value = serde_json::from_str(&line).unwrap_or_default();
                    if event["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("listening"))
                    {
                        return event["addr"]
                            .as_str()
                            .unwrap_or_else(|| panic!("no address in {label}'s line {line}"))
                            .to_owned();
                    }
                }
                Err(mpsc::TryRecvError::Empty) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!(
                    "{label} logged no `listening` line ({err}); the processes wrote:\n{}",
                    self.logs_text()
                ),
            }
        }
    }

    fn spawn_worker(&mut self, label: &str, program: &Path) -> Worker {
        let concurrency = WORKER_CONCURRENCY.to_string();
        let mut settings = WORKER_SETTINGS.to_vec();
        settings.push(("WORKER_CONCURRENCY", &concurrency));
        let (process, _) = self.spawn(label, program, &settings);
        Worker {
            pid: self.children[process].id(),
            process,
        }
    }

    /// SIGKILL: the process gets no chance to clean up.
    fn kill(&mut self, process: usize) {
        let child = &mut self.children[process];
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// SIGTERM, as an orchestrator stops a replica; waits (at most `limit`) for the process to exit.
    async fn terminate(&mut self, process: usize, limit: Duration) -> ExitStatus {
        let child = &mut self.children[process];
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {limit:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines the processes wrote.
    fn logs_text(&self) -> String {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = logs.len().saturating_sub(300);
        logs[skip..].join("\n")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            // Does nothing to a process already reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines the processes wrote ---\n{}",
                self.logs_text()
            );
        }
        delete_queue_keys(&redis_url(), &self.queue_name);
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Registers a user through `api`, logs in through `other` (the token is good on every api: one JWT_SECRET),
/// and returns the access token.
async fn new_user(client: &Client, api: &Api, other: &Api) -> String {
    let email = format!("scale-{}@example.com", Uuid::new_v4());
    let registered = client
        .post(format!("{}/auth/register", api.base))
        .json(&json!({"name": "Ada", "email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED, "register");
    let login = client
        .post(format!("{}/auth/login", other.base))
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK, "login on the other api");
    let body: Value = login.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// What one create came to.
struct Create {
    /// The create's position in the sequence.
    index: usize,
    /// The api that answered.
    answered_by: String,
    status: StatusCode,
    /// The order's id, for a 201.
    id: Option<Uuid>,
    body: String,
    /// Sends that got no answer (the api was down) before this one, each retried on the other api.
    retries: usize,
    /// Of those, sends that failed after the connection was made: the api may have read the request.
    unclear: usize,
}

/// Sends create number `index` to the api its number picks (even: the first, odd: the second); when that api does
/// not answer, to the other one, and so on (a few times). Only a sent request's answer is returned: a 201 is an
/// order created.
async fn create(
    client: &Client,
    apis: &Mutex<[(String, String); 2]>,
    token: &str,
    index: usize,
) -> Create {
    let mut retries = 0;
    let mut unclear = 0;
    let mut errors = Vec::new();
    for attempt in 0..6 {
        let (label, base) = apis.lock().unwrap()[(index + attempt) % 2].clone();
        let sent = client
            .post(format!("{base}/orders/create"))
            .bearer_auth(token)
            .json(&json!({"product_name": "Widget", "amount": 19.99}))
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                let id = (status == StatusCode::CREATED).then(|| {
                    let order: Value = serde_json::from_str(&body)
                        .unwrap_or_else(|err| panic!("create {index}: {err}: {body}"));
                    order["id"].as_str().unwrap().parse().unwrap()
                });
                return Create {
                    index,
                    answered_by: label,
                    status,
                    id,
                    body,
                    retries,
                    unclear,
                };
            }
            Err(err) => {
                retries += 1;
                if !err.is_connect() {
                    unclear += 1;
                }
                errors.push(format!("{label}: {err}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("create {index} got no answer from either api: {errors:#?}");
}

/// The orders by status, for messages.
async fn statuses(db: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as("select status::text, count(*) from orders group by 1")
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// The orders not COMPLETED, with what the database knows of them, one JSON line each: for the message of a
/// stuck order.
async fn unfinished(db: &PgPool) -> String {
    let orders: Vec<Value> = sqlx::query_scalar(
        "select to_jsonb(o) - 'product_name' - 'amount' || jsonb_build_object('history',
                (select jsonb_agg(jsonb_build_array(h.status, h.changed_by, h.changed_at) order by h.id)
                 from order_status_history h where h.order_id = o.id))
         from orders o where status <> 'COMPLETED' order by created_at limit 10",
    )
    .fetch_all(db)
    .await
    .unwrap();
    orders
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each order's history, one line per order: its transitions as (status, claim token, time). For messages.
async fn histories(db: &PgPool, ids: &[&Uuid]) -> String {
    let ids: Vec<Uuid> = ids.iter().map(|id| **id).collect();
    let rows: Vec<(Uuid, Value)> = sqlx::query_as(
        "select order_id, jsonb_agg(jsonb_build_array(status, changed_by, changed_at) order by id)
         from order_status_history where order_id = any($1) group by order_id",
    )
    .bind(&ids)
    .fetch_all(db)
    .await
    .unwrap();
    rows.iter()
        .map(|(id, history)| format!("{id}: {history}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Two apis and three workers on one queue; 1,000 orders created through both apis, alternately, 16 at a time.
/// After 300, one worker is killed (SIGKILL, while it holds an order) and one api restarted (SIGTERM, then a new
/// process); creates sent to the api while it is down are retried on the other. Every order answered 201 is in
/// the database, and none other; each is completed exactly once, and only the orders the killed worker held are
/// claimed twice.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_through_two_apis_and_three_workers_complete_exactly_once_despite_a_kill_and_a_restart(
    db: PgPool,
) {
    let started = Instant::now();
    let worker_program = worker_binary();
    let mut fleet = Fleet::new(&db);
    let workers: Vec<Worker> = (1..=3)
        .map(|n| fleet.spawn_worker(&format!("worker-{n}"), &worker_program))
        .collect();
    let first = fleet.spawn_api("api-1", UNLIMITED).await;
    let second = fleet.spawn_api("api-2", UNLIMITED).await;
    let client = client();
    let token = new_user(&client, &first, &second).await;

    // The apis creates go to, as (label, base URL): the second is replaced by its restart.
    let apis = Mutex::new([
        (first.label.clone(), first.base.clone()),
        (second.label.clone(), second.base.clone()),
    ]);
    // 0: all up; 1: a worker killed and the second api stopped; 2: the second api restarted.
    let (phase, phases) = watch::channel(0);
    let answered = AtomicUsize::new(0);
    let doomed = &workers[0];

    let creating = stream::iter(0..ORDERS)
        .map(|index| {
            let mut phases = phases.clone();
            let (apis, answered, client, token) = (&apis, &answered, &client, &token);
            async move {
                let needed = match index {
                    i if i >= AFTER_RESTART_FROM => 2,
                    i if i >= WHILE_DOWN_FROM => 1,
                    _ => 0,
                };
                phases
                    .wait_for(|p| *p >= needed)
                    .await
                    .expect("the restart sequence ended early");
                let outcome = create(client, apis, token, index).await;
                answered.fetch_add(1, Ordering::Relaxed);
                outcome
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<Create>>();

    let chaos = async {
        while answered.load(Ordering::Relaxed) < CHAOS_AFTER {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Killed while it holds an order, so that someone must take the order over once the lease expires.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let held: i64 = sqlx::query_scalar(
                "select count(*) from orders where status = 'PROCESSING' and locked_by like $1",
            )
            .bind(doomed.claims())
            .fetch_one(&db)
            .await
            .unwrap();
            if held > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "worker-1 never held an order (status: {:?})",
                statuses(&db).await
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        fleet.kill(doomed.process);
        let killed_at = Instant::now();

        let exit = fleet
            .terminate(second.process, Duration::from_secs(20))
            .await;
        assert!(
            exit.success(),
            "api-2 should stop cleanly on SIGTERM, finishing its requests; it exited with {exit}"
        );
        phase.send_replace(1);
        let restarted = fleet.spawn_api("api-2 (restarted)", UNLIMITED).await;
        apis.lock().unwrap()[1] = (restarted.label.clone(), restarted.base.clone());
        phase.send_replace(2);
        killed_at
    };
    let (creates, killed_at) = tokio::join!(creating, chaos);
    let created_in = started.elapsed();

    // Every create was answered 201, by each of the three apis in turn.
    let refused: Vec<String> = creates
        .iter()
        .filter(|c| c.status != StatusCode::CREATED)
        .map(|c| {
            format!(
                "create {} on {}: {} {}",
                c.index, c.answered_by, c.status, c.body
            )
        })
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {ORDERS} creates were not answered 201: {:#?}",
        refused.len(),
        &refused[..refused.len().min(10)]
    );
    let mut by_api: HashMap<&str, usize> = HashMap::new();
    for c in &creates {
        *by_api.entry(c.answered_by.as_str()).or_default() += 1;
    }
    for label in ["api-1", "api-2", "api-2 (restarted)"] {
        assert!(
            by_api.get(label).is_some_and(|n| *n > 0),
            "{label} created no order: {by_api:?}"
        );
    }
    let retries: usize = creates.iter().map(|c| c.retries).sum();
    let unclear: usize = creates.iter().map(|c| c.unclear).sum();
    assert!(
        retries > 0,
        "no create was sent to api-2 while it was down, so none was retried on api-1"
    );

    // The orders in the database are exactly the ones answered 201: none lost, none created twice.
    let answered_201: HashSet<Uuid> = creates.iter().filter_map(|c| c.id).collect();
    assert_eq!(answered_201.len(), ORDERS, "ids answered 201 are unique");
    let stored: HashSet<Uuid> = sqlx::query_scalar("select id from orders")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let lost: Vec<&Uuid> = answered_201.difference(&stored).collect();
    let extra: Vec<&Uuid> = stored.difference(&answered_201).collect();
    assert!(
        lost.is_empty() && extra.is_empty(),
        "{} orders answered 201 are not in the database: {lost:?}; {} orders in the database were never \
         answered 201 ({unclear} sends failed after connecting and were retried): {extra:?}",
        lost.len(),
        extra.len()
    );

    // Every order is completed: the killed worker's orders through their lease, the others as usual.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let counts = statuses(&db).await;
        if counts.get("COMPLETED") == Some(&(ORDERS as i64)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every order completed within 45 s of the last create: {counts:?}; for example:\n{}",
            unfinished(&db).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let completed_in = killed_at.elapsed();
    let parked: i64 = sqlx::query_scalar("select count(*) from orders where parked_at is not null")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(parked, 0, "orders were parked");

    // Exactly once, per the history: one PROCESSING and one COMPLETED row per order, whatever was killed and taken
    // over on the way (a takeover changes the lease's holder, not the status, and records nothing). That the
    // completion came from the claim holding the lease is the completion statement's own condition (see the
    // worker's handler tests).
    let counts: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "select o.id, count(h.id) filter (where h.status = 'PROCESSING'),
                count(h.id) filter (where h.status = 'COMPLETED')
         from orders o left join order_status_history h on h.order_id = o.id
         group by o.id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(counts.len(), ORDERS);
    let not_once: Vec<&(Uuid, i64, i64)> = counts
        .iter()
        .filter(|(_, processing, completed)| *completed != 1 || *processing != 1)
        .collect();
    assert!(
        not_once.is_empty(),
        "orders not recorded PROCESSING once and COMPLETED once, as (id, PROCESSING rows, COMPLETED rows): \
         {not_once:?}"
    );

    // Taken over: completed under another claim than the one that moved it to PROCESSING. Exactly the orders the
    // killed worker held when it died (a claim of its own that never completed), at least one (it was killed
    // holding one) and at most its concurrency. A live worker's claim is never taken over.
    let taken_over: HashSet<Uuid> = sqlx::query_scalar(
        "select p.order_id from order_status_history p join order_status_history c
           on c.order_id = p.order_id and c.status = 'COMPLETED'
         where p.status = 'PROCESSING' and c.changed_by is distinct from p.changed_by",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let held_at_death: HashSet<Uuid> = sqlx::query_scalar(
        "select distinct p.order_id from order_status_history p
         where p.status = 'PROCESSING' and p.changed_by like $1
           and not exists (select 1 from order_status_history c
                           where c.order_id = p.order_id and c.status = 'COMPLETED'
                             and c.changed_by = p.changed_by)",
    )
    .bind(doomed.claims())
    .fetch_all(&db)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(
        !held_at_death.is_empty(),
        "worker-1 was killed holding an order, yet all its claims completed"
    );
    assert!(
        held_at_death.len() <= WORKER_CONCURRENCY,
        "worker-1 held {} orders at once, more than its concurrency ({WORKER_CONCURRENCY})",
        held_at_death.len()
    );
    let lost_by_the_living: Vec<&Uuid> = taken_over.difference(&held_at_death).collect();
    assert!(
        lost_by_the_living.is_empty(),
        "{} orders were taken over though the killed worker never held them: a live worker lost its claim (its \
         job dropped, or its lease expired while it worked). Their histories:\n{}",
        lost_by_the_living.len(),
        histories(&db, &lost_by_the_living[..lost_by_the_living.len().min(5)]).await
    );
    assert_eq!(
        taken_over, held_at_death,
        "the orders taken over (left) must be exactly those the killed worker held (right)"
    );

    // Every worker took part: the queue is shared by the processes.
    for (n, worker) in workers.iter().enumerate() {
        let claims: i64 = sqlx::query_scalar(
            "select count(*) from order_status_history where status = 'PROCESSING' and changed_by like $1",
        )
        .bind(worker.claims())
        .fetch_one(&db)
        .await
        .unwrap();
        assert!(claims > 0, "worker-{} claimed no order", n + 1);
    }

    eprintln!(
        "scale out: {ORDERS} orders created in {created_in:.1?} ({by_api:?}, {retries} sends retried on the \
         other api, {unclear} of them after connecting); {} held by the killed worker and taken over; all \
         completed {completed_in:.1?} after the kill; {:.1?} in all",
        held_at_death.len(),
        started.elapsed()
    );
}

/// One login with a wrong password, from the client `forwarded_for` names (the apis trust one proxy).
async fn wrong_login(client: &Client, api: &Api, email: &str, forwarded_for: &str) -> Response {
    client
        .post(format!("{}/auth/login", api.base))
        .header("X-Forwarded-For", forwarded_for)
        .json(&json!({"email": email, "password": "not the password"}))
        .send()
        .await
        .unwrap()
}

/// A 429 as API.md words it, with a `Retry-After` of at most `max_retry_after` seconds.
async fn assert_refused(response: Response, max_retry_after: u64, what: &str) {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{what}");
    assert!(
        response.headers().contains_key(header::RETRY_AFTER),
        "{what}: no Retry-After"
    );
    let after = retry_after(&response);
    assert!(
        (1..=max_retry_after).contains(&after),
        "{what}: Retry-After {after}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"detail": "Rate limit exceeded. Try again later."}),
        "{what}"
    );
}

/// Two rate-limited apis on one queue. The login throttle (PostgreSQL) holds across them, both its count per
/// account and client and its bound per account over all clients. And so does the
/// per-client login limit (Redis, under the queue's prefix): five logins from one client over both apis, then
/// the sixth is refused, although neither api saw more than three.
///
/// The login throttle is checked first, so that it is checked even when the shared limit fails.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn login_limits_hold_across_two_api_processes(db: PgPool) {
    let mut fleet = Fleet::new(&db);
    // Two attempts per account and client, so twenty per account over all clients.
    let limited = [LIMITED, &[("LOGIN_MAX_FAILURES", "2")]].concat();
    let apis = [
        fleet.spawn_api("api-1", &limited).await,
        fleet.spawn_api("api-2", &limited).await,
    ];
    let client = client();
    let email = format!("target-{}@example.com", Uuid::new_v4());

    // One client at one account, on both apis: the pair's count is shared, so its third attempt is refused.
    for (n, api) in apis.iter().enumerate() {
        assert_eq!(
            wrong_login(&client, api, &email, "10.0.0.1").await.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {} of the client at the account, on {}",
            n + 1,
            api.label
        );
    }
    assert_refused(
        wrong_login(&client, &apis[0], &email, "10.0.0.1").await,
        900,
        "the 3rd attempt of one client at one account within 15 minutes, over two apis",
    )
    .await;

    // The account's own bound, over all clients and both apis: 20 attempts. Clients .2 to .9 spend 2 each, .10
    // one, .11 one (20 in all, with .1's two).
    let mut spent = 2;
    for n in 2..=11 {
        let tries = if n >= 10 { 1 } else { 2 };
        for _ in 0..tries {
            let api = &apis[spent % 2];
            let response = wrong_login(&client, api, &email, &format!("10.0.0.{n}")).await;
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "attempt {} at the account (client .{n}, on {})",
                spent + 1,
                api.label
            );
            spent += 1;
        }
    }
    // Spent: a client that has tried the account is refused, though its own count would allow one more...
    assert_refused(
        wrong_login(&client, &apis[1], &email, "10.0.0.10").await,
        900,
        "a client that tried the account, once its 20 attempts over both apis are spent",
    )
    .await;
    // ...while a client new to the account still has its password checked (the owner's own device gets in).
    assert_eq!(
        wrong_login(&client, &apis[0], &email, "10.0.0.12")
            .await
            .status(),
        StatusCode::UNAUTHORIZED,
        "a client new to the account"
    );
    // Only that account: another one, from an attacking client, is answered as usual.
    let bystander = format!("bystander-{}@example.com", Uuid::new_v4());
    assert_eq!(
        wrong_login(&client, &apis[1], &bystander, "10.0.0.2")
            .await
            .status(),
        StatusCode::UNAUTHORIZED,
        "another account"
    );

    // The client: one address, each attempt at an account of its own, so that no account throttle is reached.
    let client_ip = "10.0.1.1";
    for n in 1..=5 {
        let api = &apis[(n - 1) % 2];
        let email = format!("nobody-{n}-{}@example.com", Uuid::new_v4());
        let response = wrong_login(&client, api, &email, client_ip).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "login {n} of one client, on {}",
            api.label
        );
    }
    let email = format!("nobody-6-{}@example.com", Uuid::new_v4());
    let sixth = wrong_login(&client, &apis[1], &email, client_ip).await;
    assert_refused(
        sixth,
        12,
        "the 6th login of one client within a minute, on api-2, which saw only 2 of the 5 before: the limit \
         must be counted in Redis, shared by the apis (RATE_LIMIT_SHARED)",
    )
    .await;
}
