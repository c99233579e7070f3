//! `api healthcheck`, the containers' healthcheck (the image has no curl): exit 0 when the URL answers 2xx, 1 when
//! it answers anything else or nothing.

use std::process::Output;

use sqlx::PgPool;

use crate::helpers::TestApp;

/// Runs `api healthcheck ARGS` with only PATH and the given variables in its environment.
async fn healthcheck(args: &[&str], vars: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("healthcheck")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars.iter().copied())
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap()
}

fn report(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn exits_zero_when_the_api_answers_and_one_when_it_answers_an_error(db: PgPool) {
    let app = TestApp::spawn(db).await;

    for path in ["/health/live", "/health/ready"] {
        let output = healthcheck(&["--url", &app.url(path)], &[]).await;
        assert_eq!(output.status.code(), Some(0), "{path}: {}", report(&output));
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("200 OK"),
            "{}",
            report(&output)
        );
    }

    // Without --url: /health/live on BIND_ADDR.
    let addr = app.base.strip_prefix("http://").unwrap();
    let output = healthcheck(&[], &[("BIND_ADDR", addr)]).await;
    assert_eq!(output.status.code(), Some(0), "{}", report(&output));

    // An answer that is not 2xx is a failure, with the status line on stderr.
    let output = healthcheck(&["--url", &app.url("/no-such-route")], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", report(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("404"),
        "{}",
        report(&output)
    );
}

#[tokio::test]
async fn exits_one_against_a_closed_port_or_a_silent_one() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}/health/live");
    let output = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", report(&output));

    // A listener that accepts and never answers: the timeout ends the wait.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/health/live", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let output = healthcheck(&["--url", &url, "--timeout-ms", "300"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", report(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no answer within 300 ms"),
        "{}",
        report(&output)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    drop(silent);
}
