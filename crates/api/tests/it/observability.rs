//! What ops see: Prometheus metrics, request ids, and logs without secrets.

use std::{
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    helpers::{
        KillOnDrop, PASSWORD, TestApp, database_url_of, forward_lines, json, listening_address,
    },
    own_redis::OwnRedis,
};

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn metrics_list_requests_latencies_and_orders_created(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let created = app
        .create_order(
            &user.access,
            &json!({"product_name": "Widget", "amount": 1}),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    // Only on the metrics listener (METRICS_ADDR), never on the public port.
    let public = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), StatusCode::NOT_FOUND);
    let metrics_url = format!("{}/metrics", app.metrics_base.as_deref().unwrap());
    let response = app.client.get(metrics_url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for series in [
        r#"http_requests_total{method="POST",route="/orders/create",status="201"}"#,
        r#"http_request_duration_seconds_bucket{method="POST",route="/orders/create",status="201",le="0.1"}"#,
        r#"http_requests_total{method="POST",route="/auth/login",status="200"}"#,
        "orders_created_total ",
        "# TYPE http_request_duration_seconds histogram",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    // Ids never become labels: the route template is used.
    let id = json(app.get(&user.access, "/orders/my-orders").await).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.get(&user.access, &format!("/orders/{id}")).await;
    let text = app.metrics().await;
    assert!(text.contains(r#"route="/orders/{id}""#));
    assert!(!text.contains(&id));
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_request_id_is_returned_and_generated_when_missing_or_unusable(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let given = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "abc-123");
    let generated = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let forged = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "a b\tc")
        .send()
        .await
        .unwrap();
    assert!(uuid::Uuid::parse_str(forged.headers()["x-request-id"].to_str().unwrap()).is_ok());
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn logs_carry_the_request_id_and_never_a_secret(pool: PgPool) {
    let secret = "a-jwt-secret-that-must-never-be-logged-0123456789";
    let mut api = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_api"))
            .env("DATABASE_URL", database_url_of(&pool))
            .env("REDIS_URL", crate::helpers::redis_url())
            .env("QUEUE_NAME", format!("test-{}", uuid::Uuid::now_v7()))
            .env("JWT_SECRET", secret)
            .env("BIND_ADDR", "127.0.0.1:0")
            // Metrics may have a listener of their own: never on a fixed port another test could hold.
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (sender, lines) = mpsc::channel();
    forward_lines(api.0.stdout.take().unwrap(), sender.clone());
    forward_lines(api.0.stderr.take().unwrap(), sender);
    let mut logs = Vec::new();
    let base = format!("http://{}", listening_address(&lines, &mut logs));
    let client = reqwest::Client::new();
    let email = "ada@example.com";
    let registered = client
        .post(format!("{base}/auth/register"))
        .json(&json!({"name": "Ada", "email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED);
    let login = client
        .post(format!("{base}/auth/login"))
        .header("x-request-id", "login-request-42")
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let tokens = json(login).await;
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    let refreshed = client
        .post(format!("{base}/auth/refresh"))
        .json(&json!({"refresh_token": refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), StatusCode::OK);
    let new_tokens = json(refreshed).await;
    let me = client
        .get(format!("{base}/auth/me"))
        .bearer_auth(new_tokens["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let wrong = client
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": email, "password": "a wrong password, also secret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    Command::new("kill")
        .args(["-TERM", &api.0.id().to_string()])
        .status()
        .unwrap();
    let status = api.0.wait().unwrap();
    assert!(status.success(), "api exited with {status}");
    // Both pipes are closed now: the rest of the lines, up to the last.
    logs.extend(lines.iter());
    let logs = logs.join("\n");

    assert!(
        logs.lines().count() > 10,
        "expected trace logs, got:\n{logs}"
    );
    for (what, value) in [
        ("the password", PASSWORD),
        ("a wrong password", "a wrong password, also secret"),
        ("the JWT secret", secret),
        ("the access token", tokens["access_token"].as_str().unwrap()),
        (
            "the refresh token",
            tokens["refresh_token"].as_str().unwrap(),
        ),
        (
            "the new access token",
            new_tokens["access_token"].as_str().unwrap(),
        ),
        (
            "the new refresh token",
            new_tokens["refresh_token"].as_str().unwrap(),
        ),
    ] {
        assert!(!logs.contains(value), "{what} appears in the logs");
    }
    let login_line = logs
        .lines()
        .find(|line| line.contains("user logged in"))
        .expect("a login log line");
    assert!(login_line.contains("login-request-42"), "{login_line}");
    assert!(
        login_line.starts_with('{'),
        "LOG_FORMAT=json gives JSON lines: {login_line}"
    );
}

#[test]
fn the_api_refuses_to_start_with_a_short_secret_or_an_unsupported_algorithm() {
    let long = "a-secret-long-enough-for-hmac-sha256-keys";
    for (secret, algorithm, expected) in [
        (
            "short-secret-value",
            "HS256",
            "JWT_SECRET must be at least 32 bytes",
        ),
        (long, "RS256", "JWT_ALGORITHM must be HS256, HS384 or HS512"),
        (long, "none", "JWT_ALGORITHM must be HS256, HS384 or HS512"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_api"))
            .env("JWT_SECRET", secret)
            .env("JWT_ALGORITHM", algorithm)
            .env("BIND_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{secret} {algorithm}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains(secret), "the secret is echoed: {stderr}");
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn metrics_show_the_version_and_eviction_policy_of_the_redis_in_use(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    // What the Redis itself says, asked another way than the app does.
    let mut redis = redis::Client::open(crate::helpers::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (_, policy): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut redis)
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut redis)
        .await
        .unwrap();
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap()
        .trim();
    let labels = [
        format!(r#"version="{version}""#),
        format!(r#"maxmemory_policy="{policy}""#),
    ];
    // The app reads Redis in the background once it runs.
    let started = std::time::Instant::now();
    loop {
        let metrics = app.metrics().await;
        let exported = metrics.lines().any(|line| {
            line.starts_with("redis_server_info{")
                && line.ends_with("} 1")
                && labels.iter().all(|label| line.contains(label.as_str()))
        });
        if exported {
            assert!(metrics.contains("# HELP redis_server_info "), "{metrics}");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "no redis_server_info with {labels:?} in:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// How many PINGs the Redis server at `url` has answered.
async fn pings_answered(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_ping:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_flood_of_readiness_checks_probes_the_dependencies_at_most_once_a_second(pool: PgPool) {
    let mut redis = OwnRedis::new();
    redis.start().await;
    let url = redis.url();
    let app = TestApp::spawn_with(pool, |config| config.queue.redis_url = url.clone()).await;
    let ready = app.url("/health/ready");

    let before = pings_answered(&url).await;
    let started = Instant::now();
    let mut answered = 0;
    for _ in 0..5 {
        let round = join_all((0..40).map(|_| app.client.get(&ready).send())).await;
        for response in round {
            assert_eq!(response.unwrap().status(), StatusCode::OK);
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let probes = pings_answered(&url).await - before;
    println!("{answered} readiness checks in {seconds:.1} s made {probes} Redis probes");
    assert!(probes >= 1, "no probe at all");
    assert!(
        probes as f64 <= seconds.ceil() + 1.0,
        "{answered} readiness checks in {seconds:.1} s made {probes} Redis probes"
    );

    // A result is reused for a second only: Redis gone, readiness says so soon after.
    redis.stop();
    let mut status = StatusCode::OK;
    for _ in 0..40 {
        status = app.client.get(&ready).send().await.unwrap().status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}
