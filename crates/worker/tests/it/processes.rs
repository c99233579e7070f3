//! The `worker` binary as ops run it: killed with SIGKILL, stopped with SIGTERM.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use orders_core::domain::OrderStatus;
use sqlx::PgPool;

use crate::{
    helpers::{
        TestQueue, count_with_status, create_and_enqueue, database_url, fast_settings,
        spawn_binary, spawn_worker, status_of, wait_until,
    },
    own_redis::OwnRedis,
};

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_order_held_by_a_killed_worker_is_completed_by_another(db: PgPool) {
    let queue = TestQueue::new();
    let mut doomed = spawn_binary(&db, &queue, 1000, 3000);
    let [id] = create_and_enqueue(&db, &queue.push_queue(), 1).await[..] else {
        unreachable!()
    };
    wait_until(
        Duration::from_secs(20),
        "the order to be PROCESSING",
        || async { status_of(&db, id).await == OrderStatus::Processing },
    )
    .await;
    doomed.kill().expect("SIGKILL");
    doomed.wait().expect("reaped");
    let killed_at = Instant::now();

    let mut settings = fast_settings();
    settings.order_lease_ms = 3000;
    let (stop, survivor) = spawn_worker(&db, &queue.config, settings);
    wait_until(
        Duration::from_secs(20),
        "the order to be COMPLETED",
        || async { status_of(&db, id).await == OrderStatus::Completed },
    )
    .await;
    // The README's bound: lease + reconcile interval + pickup + the remaining stages.
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "took {:?}",
        killed_at.elapsed()
    );
    stop.cancel();
    survivor.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn sigterm_lets_the_job_in_flight_finish_and_exits_0(db: PgPool) {
    let queue = TestQueue::new();
    let mut worker = spawn_binary(&db, &queue, 1500, 5000);
    let [id] = create_and_enqueue(&db, &queue.push_queue(), 1).await[..] else {
        unreachable!()
    };
    wait_until(
        Duration::from_secs(20),
        "the order to be PROCESSING",
        || async { status_of(&db, id).await == OrderStatus::Processing },
    )
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = worker.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "worker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
    assert_eq!(status_of(&db, id).await, OrderStatus::Completed);
}

/// The address in the worker's `metrics at /metrics` line (`LOG_FORMAT=json`), which it logs once bound: with
/// `WORKER_METRICS_ADDR=127.0.0.1:0` the system picks a free port and only the worker knows which. Every line
/// read on the way is kept in `logs`.
fn metrics_address(lines: &mpsc::Receiver<String>, logs: &mut Vec<String>) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|err| {
                panic!(
                    "no `metrics at` line from the worker ({err}); it wrote:\n{}",
                    logs.join("\n")
                )
            });
        logs.push(line);
        let line = logs.last().unwrap();
        if line.contains(r#""message":"metrics at /metrics""#) {
            return line
                .split_once(r#""addr":""#)
                .and_then(|(_, rest)| rest.split_once('"'))
                .and_then(|(addr, _)| addr.parse().ok())
                .unwrap_or_else(|| panic!("no address in {line}"));
        }
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_worker_serves_metrics_and_logs_the_order_id(db: PgPool) {
    let queue = TestQueue::new();
    let (mut worker, lines) = spawn_with_json_logs(&db, &queue, &[]);
    let mut logs = Vec::new();
    let metrics_addr = metrics_address(&lines, &mut logs);
    let [id] = create_and_enqueue(&db, &queue.push_queue(), 1).await[..] else {
        unreachable!()
    };
    wait_until(
        Duration::from_secs(20),
        "the order to be COMPLETED",
        || async { status_of(&db, id).await == OrderStatus::Completed },
    )
    .await;
    let metrics = scrape(metrics_addr).await;
    for series in [
        r#"worker_jobs_total{outcome="completed"} 1"#,
        r#"worker_jobs_total{outcome="failed"} 0"#,
        "worker_jobs_retried_total 0",
        "worker_job_duration_seconds_bucket",
        r#"order_transitions_total{to="COMPLETED"} 1"#,
        "queue_jobs_waiting 0",
        "orders_pending 0",
        "orders_oldest_pending_age_seconds 0",
        "worker_reconciler_requeued_total",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }

    worker.terminate();
    // The pipe is closed now: the rest of the lines, up to the last.
    logs.extend(lines.iter());
    let logs = logs.join("\n");
    let transitions: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("order transition"))
        .collect();
    assert_eq!(transitions.len(), 2, "{logs}");
    let job_lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("handle_job"))
        .collect();
    assert!(job_lines.len() >= 2, "{logs}");
    for line in job_lines {
        assert!(
            line.contains(&id.to_string()),
            "a job log line without the order id: {line}"
        );
    }
}

/// The `worker` binary on the test's database and queue, logging JSON at info level, with `settings` on top of
/// the defaults (environment variables), and with its output lines
/// forwarded to the returned receiver from a thread of its own (so the test can watch for a line while the
/// worker runs). Killed when dropped, so that a failed test leaves no worker behind.
fn spawn_with_json_logs(
    db: &PgPool,
    queue: &TestQueue,
    settings: &[(&str, &str)],
) -> (KillOnDrop, mpsc::Receiver<String>) {
    let mut worker = Command::new(env!("CARGO_BIN_EXE_worker"))
        .env("DATABASE_URL", database_url(db))
        .env("REDIS_URL", &queue.config.redis_url)
        .env("QUEUE_NAME", &queue.config.queue_name)
        .env("ORDER_STAGE_DELAY_MS", "10")
        .env("WORKER_METRICS_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(settings.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("worker binary");
    let (sender, lines) = mpsc::channel();
    let stdout = worker.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    (KillOnDrop(worker), lines)
}

/// A child process killed (SIGKILL) when dropped, unless it has exited already.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// Stops it with SIGTERM and asserts that it exits 0.
    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The `redis_server_info` line of a `/metrics` text, if it has one.
fn redis_server_info(metrics: &str) -> Option<&str> {
    metrics
        .lines()
        .find(|line| line.starts_with("redis_server_info{"))
}

/// The `redis_version` of the queue's Redis, as its `INFO server` says.
async fn redis_version(queue: &TestQueue) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut queue.redis().await)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .expect("INFO server has redis_version")
        .trim()
        .to_owned()
}

/// Runs the `worker` binary on `redis` until its `/metrics` shows `redis_server_info` with `policy`, then 3 s
/// more (past the check's 2 s retry interval, so that a second report would show), and stops it. Returns its
/// logs. With `start_redis_late`, Redis starts only once the worker has: the check retries until it answers.
async fn worker_logs_with(
    db: &PgPool,
    redis: &mut OwnRedis,
    policy: &str,
    start_redis_late: bool,
) -> String {
    if !start_redis_late {
        redis.start().await;
    }
    let queue = TestQueue::at(&redis.url());
    let (mut worker, lines) = spawn_with_json_logs(db, &queue, &[]);
    let mut logs = Vec::new();
    let metrics_addr = metrics_address(&lines, &mut logs);
    if start_redis_late {
        redis.start().await;
    }
    let version = redis_version(&queue).await;
    let expected = [
        format!(r#"version="{version}""#),
        format!(r#"maxmemory_policy="{policy}""#),
    ];
    wait_until(
        Duration::from_secs(20),
        "redis_server_info on the worker's /metrics",
        || async {
            let metrics = scrape(metrics_addr).await;
            redis_server_info(&metrics).is_some_and(|line| {
                line.ends_with("} 1") && expected.iter().all(|label| line.contains(label.as_str()))
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    worker.terminate();
    // The pipe is closed now: the rest of the lines, up to the last.
    logs.extend(lines.iter());
    logs.join("\n")
}

/// The worker's warning about Redis's eviction policy.
const EVICTION_WARNING: &str = "not noeviction";
/// The worker's warning about Redis's version.
const VERSION_WARNING: &str = "older than any version the service is tested with";

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_evicting_redis_is_warned_about_once_and_exported(db: PgPool) {
    let mut redis =
        OwnRedis::with_args(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let logs = worker_logs_with(&db, &mut redis, "allkeys-lru", false).await;
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains(EVICTION_WARNING))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    for part in [
        r#""level":"WARN""#,
        "maxmemory-policy is allkeys-lru",
        "re-driven from PostgreSQL",
        "Set `maxmemory-policy noeviction`",
    ] {
        assert!(
            warnings[0].contains(part),
            "{part} missing from {}",
            warnings[0]
        );
    }
    // The Redis the tests run (7.0 or later) is not warned about.
    assert!(!logs.contains(VERSION_WARNING), "{logs}");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_noeviction_redis_that_comes_up_after_the_worker_is_exported_without_a_warning(
    db: PgPool,
) {
    let mut redis = OwnRedis::new();
    let logs = worker_logs_with(&db, &mut redis, "noeviction", true).await;
    assert!(!logs.contains(EVICTION_WARNING), "{logs}");
    assert!(!logs.contains(VERSION_WARNING), "{logs}");
}

/// The string value of the field `name` in one JSON log line.
fn json_field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_once(&format!(r#""{name}":""#))
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(value, _)| value)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// The worker's `/metrics` text.
async fn scrape(metrics_addr: SocketAddr) -> String {
    reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of each `queue_unreadable_entries_total` series on the worker's `/metrics`, by problem.
async fn unreadable_entries(metrics_addr: SocketAddr) -> Vec<(String, u64)> {
    let metrics = scrape(metrics_addr).await;
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(r#"queue_unreadable_entries_total{problem=""#))
        .filter_map(|rest| rest.split_once(r#""} "#))
        .map(|(problem, value)| (problem.to_owned(), value.parse().unwrap()))
        .collect()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn each_unreadable_entry_is_logged_once_counted_and_its_order_completed(db: PgPool) {
    let queue = TestQueue::new();
    let orders = create_and_enqueue(&db, &queue.push_queue(), 40).await.len() as i64;
    let damaged = crate::partial_loss::damage(&queue).await as u64;
    let (mut worker, lines) = spawn_with_json_logs(
        &db,
        &queue,
        &[
            ("RECONCILE_INTERVAL_MS", "200"),
            ("RECONCILE_REDELIVER_AFTER_MS", "1000"),
        ],
    );
    let mut logs = Vec::new();
    let metrics_addr = metrics_address(&lines, &mut logs);
    wait_until(Duration::from_secs(60), "every order COMPLETED", || async {
        count_with_status(&db, "COMPLETED").await == orders
    })
    .await;
    // Each damaged entry is found once, by the janitor's sweep or after the consumer failed on it; a duplicate
    // fetched in one batch collapses into one entry of the in-flight set and may go unnoticed.
    let total = || async {
        unreadable_entries(metrics_addr)
            .await
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    wait_until(
        Duration::from_secs(20),
        "the damage to be counted",
        || async { total().await >= damaged - 1 },
    )
    .await;
    // A few more sweeps: nothing is found twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counted = unreadable_entries(metrics_addr).await;
    worker.terminate();
    logs.extend(lines.iter());
    let found: Vec<&String> = logs
        .iter()
        .filter(|line| line.contains("queue: unreadable entry"))
        .collect();
    let sum: u64 = counted.iter().map(|(_, n)| n).sum();
    // A job acknowledged while its own entry was being removed can leave one more stray metadata hash behind.
    assert!(
        sum >= damaged - 1,
        "{sum} counted of {damaged}: {counted:?}"
    );
    assert_eq!(found.len() as u64, sum, "one line per entry:\n{found:#?}");
    let mut entries: Vec<(&str, &str)> = found
        .iter()
        .map(|line| (json_field(line, "entry"), json_field(line, "problem")))
        .collect();
    entries.sort_unstable();
    entries.dedup();
    assert_eq!(
        entries.len() as u64,
        sum,
        "an entry logged twice:\n{found:#?}"
    );
    for (problem, expected) in [
        ("no_meta", 4),
        ("bad_meta", 1),
        ("no_data", 3),
        ("bad_data", 2),
        ("bad_id", 1),
        ("orphan_data", 1),
        ("stray_meta", 1),
    ] {
        let n = counted
            .iter()
            .find(|(name, _)| name == problem)
            .map_or(0, |(_, n)| *n);
        assert!(n >= expected, "{problem}: {counted:?}");
    }
    // The repaired and the lost jobs both say which order they were for.
    for line in &found {
        if line.contains(r#""problem":"no_meta""#) || line.contains(r#""problem":"orphan_data""#) {
            assert!(!line.contains(r#""order_id":"unknown""#), "{line}");
        }
    }
    assert!(
        !logs.iter().any(|line| line.contains("is Redis up?")),
        "Redis answered throughout"
    );
    assert_eq!(crate::partial_loss::not_recorded_once(&db).await, []);
}
