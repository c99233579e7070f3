//! What the hardening review found, each pinned by a test that failed before its fix: bounded metric labels on a
//! listener of their own, the login throttle per account, sessions that end and rows that get purged, secrets
//! kept out of `Debug`, exact amounts, a create that commits is answered 201, and migrations that wait.

use std::time::{Duration, Instant};

use api::Config;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use clap::Parser;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{JWT_SECRET, PASSWORD, TestApp, database_url_of, json, retry_after};

/// The series of `/metrics` that carry a `method` label, as `name{labels}`.
fn method_series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#') && line.contains("method=\""))
        .map(|line| {
            line.rsplit_once(' ')
                .map_or(line, |(series, _)| series)
                .to_owned()
        })
        .collect()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn random_methods_and_paths_do_not_grow_the_metrics(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let send_random = |n: usize| {
        let app = &app;
        async move {
            for _ in 0..n {
                let token = Uuid::new_v4().simple().to_string().to_uppercase();
                let method = Method::from_bytes(format!("X{token}").as_bytes()).unwrap();
                let path = format!("/orders/{token}/x{token}");
                let response = app
                    .client
                    .request(method, app.url(&path))
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_client_error(), "{}", response.status());
            }
        }
    };
    send_random(1).await;
    let before = method_series(&app.metrics().await);
    send_random(1000).await;
    let metrics = app.metrics().await;
    let after = method_series(&metrics);
    let other = |series: &[String]| {
        series
            .iter()
            .filter(|s| s.contains(r#"method="other""#))
            .count()
    };
    assert_eq!(
        other(&after),
        other(&before),
        "series of unknown methods grew"
    );
    assert!(other(&after) > 0, "unknown methods are counted as `other`");
    for series in &after {
        let method = series
            .split("method=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(
            [
                "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE",
                "other"
            ]
            .contains(&method),
            "unbounded method label in {series}"
        );
        assert!(
            !series.contains("/x"),
            "a raw path became a label: {series}"
        );
    }
}

/// Logs in with a wrong password; returns the status, the `Retry-After` header and the body.
async fn wrong_login(app: &TestApp, email: &str) -> (StatusCode, Option<u64>, Value) {
    let response = app.login(email, "not the password at all").await;
    let status = response.status();
    let retry_after = response
        .headers()
        .contains_key(header::RETRY_AFTER)
        .then(|| retry_after(&response));
    (status, retry_after, json(response).await)
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn ten_failed_logins_throttle_the_account_known_or_not_across_processes(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let other_process = TestApp::spawn(pool).await;
    let known = format!("known-{}@example.com", Uuid::new_v4());
    assert_eq!(app.register(&known).await.status(), StatusCode::CREATED);
    let unknown = format!("nobody-{}@example.com", Uuid::new_v4());

    let mut throttled = Vec::new();
    for email in [&known, &unknown] {
        for attempt in 1..=10 {
            let (status, _, _) = wrong_login(&app, email).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "attempt {attempt} for {email}"
            );
        }
        // The 11th, on another api process: the count lives in PostgreSQL.
        let (status, retry_after, body) = wrong_login(&other_process, email).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{email}: {body}");
        let retry_after = retry_after.expect("Retry-After");
        assert!((1..=900).contains(&retry_after), "{retry_after}");
        throttled.push(body);
    }
    assert_eq!(
        throttled[0], throttled[1],
        "the answer tells which account exists"
    );
    assert_eq!(
        throttled[0],
        json!({"detail": "Rate limit exceeded. Try again later."})
    );
    // While it holds, even the right password is refused unchecked.
    assert_eq!(
        app.login(&known, PASSWORD).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Other accounts are not affected.
    let bystander = format!("bystander-{}@example.com", Uuid::new_v4());
    assert_eq!(app.register(&bystander).await.status(), StatusCode::CREATED);
    assert_eq!(
        app.login(&bystander, PASSWORD).await.status(),
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_successful_login_resets_the_account_throttle(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let email = format!("user-{}@example.com", Uuid::new_v4());
    assert_eq!(app.register(&email).await.status(), StatusCode::CREATED);
    for _ in 0..9 {
        assert_eq!(wrong_login(&app, &email).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.login(&email, PASSWORD).await.status(), StatusCode::OK);
    // A fresh count: ten more failures are answered 401, the next one 429.
    for _ in 0..10 {
        assert_eq!(wrong_login(&app, &email).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        wrong_login(&app, &email).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// The claims of a JWT, unverified.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn refreshing_never_extends_a_session_past_session_max_days(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        config.session_max_days = 1;
        config.refresh_token_expire_days = 7;
    })
    .await;
    let logged_in = chrono::Utc::now().timestamp();
    let mut tokens = app.new_user().await;
    let session_end = logged_in + 24 * 60 * 60;
    for _ in 0..3 {
        let response = app.refresh(&tokens.refresh).await;
        assert_eq!(response.status(), StatusCode::OK);
        let cookie = response.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        let max_age: i64 = cookie
            .split("Max-Age=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            max_age <= 24 * 60 * 60,
            "cookie outlives the session: {cookie}"
        );
        let body = json(response).await;
        tokens.refresh = body["refresh_token"].as_str().unwrap().to_owned();
        let exp = claims(&tokens.refresh)["exp"].as_i64().unwrap();
        assert!(
            exp <= session_end + 2,
            "refresh token outlives the session: exp {exp}, session ends {session_end}"
        );
        assert!(
            claims(body["access_token"].as_str().unwrap())["exp"]
                .as_i64()
                .unwrap()
                <= session_end + 2
        );
    }
    let ends: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select distinct session_expires_at from refresh_tokens")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        ends.len(),
        1,
        "every token of the session shares its end: {ends:?}"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_refresh_token_after_the_session_ended_is_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    // Thirty days later, as far as the database is concerned (the token's own `exp` is still ahead).
    sqlx::query(
        "update refresh_tokens set session_expires_at = now() - interval '1 second',
                                   expires_at = now() - interval '1 second'",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let response = app.refresh(&tokens.refresh).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        json(response).await["detail"],
        "Invalid or expired refresh token"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn dead_tokens_and_ended_login_windows_are_purged_in_batches(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let live = app.new_user().await;
    let logged_out = app.new_user().await;
    let response = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(&logged_out.access)
        .json(&json!({"refresh_token": logged_out.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let expired = app.new_user().await;
    let refreshed = app.refresh(&expired.refresh).await;
    assert_eq!(refreshed.status(), StatusCode::OK);
    let expired_refresh = json(refreshed).await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // 2,500 expired tokens of that session (more than two batches), as months of refreshes leave behind.
    sqlx::query(
        "insert into refresh_tokens (id, family_id, user_id, token_hash, expires_at, session_expires_at)
         select gen_random_uuid(), family_id, user_id, sha256(gen_random_uuid()::text::bytea),
                now() - interval '1 day', session_expires_at
         from refresh_tokens, generate_series(1, 2500) where token_hash = sha256($1::bytea)",
    )
    .bind(expired_refresh.as_bytes())
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "insert into login_attempts (email, attempts, window_start) values
         ('old@example.com', 3, now() - interval '16 minutes'), ('new@example.com', 3, now())",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let total_before = app.count("refresh_tokens").await;
    let (tokens, logins) = api::startup::purge(&app.db).await.unwrap();
    // The logged-out session's token, its used predecessor none (it was never refreshed), and the 2,500.
    assert_eq!(tokens, 2501, "purged {tokens}");
    assert_eq!(logins, 1);
    assert_eq!(app.count("refresh_tokens").await, total_before - 2501);
    let emails: Vec<String> = sqlx::query_scalar("select email from login_attempts")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(emails, ["new@example.com"]);
    // Live sessions are untouched.
    assert_eq!(app.refresh(&live.refresh).await.status(), StatusCode::OK);
    assert_eq!(app.refresh(&expired_refresh).await.status(), StatusCode::OK);
}

#[test]
fn configurations_print_without_their_secrets() {
    let api = Config::parse_from([
        "api",
        "--jwt-secret",
        JWT_SECRET,
        "--database-url",
        "postgres://orders:db-password-123@db:5432/orders",
        "--redis-url",
        "redis://:redis-password-456@cache:6379/0",
    ]);
    let worker = worker::Config::parse_from([
        "worker",
        "--database-url",
        "postgres://orders:db-password-123@db:5432/orders",
        "--redis-url",
        "redis://:redis-password-456@cache:6379/0",
    ]);
    for printed in [
        format!("{api:?}"),
        format!("{api:#?}"),
        format!("{worker:?}"),
        format!("{worker:#?}"),
    ] {
        for secret in ["db-password-123", "redis-password-456", JWT_SECRET] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(
            printed.contains("db:5432/orders") && printed.contains("cache:6379"),
            "{printed}"
        );
    }
}

/// Creates an order from a raw JSON body, so that numbers arrive exactly as written.
async fn create_raw(app: &TestApp, token: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.url("/orders/create"))
        .bearer_auth(token)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn amounts_are_read_exactly_as_written(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    for amount in [
        "19.999999999999999999",
        "20.000000000000000001",
        "0.0100000000000000001",
    ] {
        let response = create_raw(
            &app,
            &user.access,
            &format!(r#"{{"product_name": "W", "amount": {amount}}}"#),
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{amount}"
        );
        let body = json(response).await;
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["body", "amount"]),
            "{body}"
        );
        assert_eq!(body["detail"][0]["type"], "decimal_max_places", "{body}");
    }
    for (sent, stored) in [
        ("12345678.91", "12345678.91"),
        ("999999999.99", "999999999.99"),
        ("1999e-2", "19.99"),
    ] {
        let response = create_raw(
            &app,
            &user.access,
            &format!(r#"{{"product_name": "W", "amount": {sent}}}"#),
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED, "{sent}");
        let id = json(response).await["id"].as_str().unwrap().to_owned();
        let text: String =
            sqlx::query_scalar("select amount::text from orders where id = $1::uuid")
                .bind(&id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(
            text.trim_end_matches('0').trim_end_matches('.'),
            stored,
            "{sent}"
        );
    }
    let response = create_raw(
        &app,
        &user.access,
        r#"{"product_name": "W", "amount": "19.99"}"#,
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json(response).await["detail"][0]["type"], "float_type");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_create_that_commits_late_is_still_answered_201(pool: PgPool) {
    // The insert waits 5 s for a lock: longer than the old 4.5 s request timeout, within the statement timeout.
    let app = TestApp::spawn_with(pool, |config| {
        config.database.database_statement_timeout_ms = 8000;
    })
    .await;
    let user = app.new_user().await;
    let mut blocker = app.db.begin().await.unwrap();
    sqlx::query("lock table orders in share mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        blocker.rollback().await.unwrap();
    });
    let started = Instant::now();
    let response = app
        .create_order(
            &user.access,
            &json!({"product_name": "Widget", "amount": 5}),
        )
        .await;
    release.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "the insert did not wait for the lock"
    );
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(app.count("orders").await, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn migrating_waits_for_a_lock_longer_than_the_statement_timeout(pool: PgPool) {
    let mut config = crate::helpers::test_config();
    config.database.database_url = database_url_of(&pool);
    config.database.database_statement_timeout_ms = 300;
    // Another process holds the migrations table (as while it migrates) for longer than 300 ms.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("lock table _sqlx_migrations in access exclusive mode")
        .execute(&mut *other)
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        other.rollback().await.unwrap();
    });
    let migrated = orders_core::db::migrate(&config.database).await;
    release.await.unwrap();
    migrated.expect("migrations wait for the lock instead of timing out");
    // The pool still has its statement timeout.
    let db = orders_core::db::connect(&config.database).await.unwrap();
    let timeout: String = sqlx::query_scalar("show statement_timeout")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(timeout, "300ms");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn api_migrate_migrates_and_exits_without_a_jwt_secret(pool: PgPool) {
    let name = format!("migrate_{}", Uuid::new_v4().simple());
    let url = database_url_of(&pool);
    let url = format!("{}/{name}", url.rsplit_once('/').unwrap().0);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let tables: i64 = sqlx::query_scalar("select count(*) from pg_database where datname = $1")
        .bind(&name)
        .fetch_one(&pool)
        .await
        .unwrap();
    let applied = if tables == 1 {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let applied: i64 =
            sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        sqlx::Connection::close(conn).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("drop database {name}")))
            .execute(&pool)
            .await
            .unwrap();
        applied
    } else {
        0
    };
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        output.status
    );
    assert_eq!(applied, orders_core::MIGRATOR.iter().count() as i64);
}

#[test]
fn a_missing_jwt_secret_is_named_with_where_to_put_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND_ADDR", "127.0.0.1:0")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("JWT_SECRET is not set") && stderr.contains(".env"),
        "{stderr}"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_connection_budget_is_read_from_the_server(pool: sqlx::PgPool) {
    use orders_core::db::ConnectionBudget;
    let max: i64 = sqlx::query_scalar("select current_setting('max_connections')::bigint")
        .fetch_one(&pool)
        .await
        .unwrap();
    let before = ConnectionBudget::read(&pool).await.unwrap();
    assert_eq!(before.max, max);
    assert!(before.reserved >= 1, "{before:?}");
    assert!(before.in_use >= 1, "{before:?}");
    // Five more connections held open are seen, with the one reading (other tests open and close theirs meanwhile,
    // so at least these six).
    let held = sqlx::postgres::PgPoolOptions::new()
        .min_connections(5)
        .max_connections(5)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(held.acquire().await.unwrap());
    }
    let after = ConnectionBudget::read(&pool).await.unwrap();
    assert!(after.in_use >= 6, "{after:?}");
    assert_eq!(after.free(), after.max - after.reserved - after.in_use);
    assert!(after.fits(1));
    assert!(!after.fits(u32::try_from(after.max).unwrap() + 1));
}

/// Logs in to `email` from `client` (behind one trusted proxy, which appends the client's address).
async fn login_from(app: &TestApp, email: &str, password: &str, client: &str) -> reqwest::Response {
    app.client
        .post(app.url("/auth/login"))
        .header("X-Forwarded-For", client)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Wrong passwords for `email` from `client` until one is refused with 429: how many were answered 401 first.
async fn guesses_until_throttled(app: &TestApp, email: &str, client: &str) -> usize {
    for guesses in 0..50 {
        let response = login_from(app, email, "not the password at all", client).await;
        match response.status() {
            StatusCode::UNAUTHORIZED => {}
            StatusCode::TOO_MANY_REQUESTS => {
                assert!((1..=900).contains(&retry_after(&response)));
                assert_eq!(
                    json(response).await,
                    json!({"detail": "Rate limit exceeded. Try again later."})
                );
                return guesses;
            }
            other => panic!("{other} from {client}"),
        }
    }
    panic!("{client} was never throttled")
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn guesses_from_many_addresses_do_not_lock_the_owner_out(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.trust_proxy_hops = Some(1)).await;
    let email = format!("owner-{}@example.com", Uuid::new_v4());
    assert_eq!(app.register(&email).await.status(), StatusCode::CREATED);
    let owner = "198.51.100.7";

    // One address: ten wrong passwords, then 429 (LOGIN_MAX_FAILURES per account and client).
    assert_eq!(
        guesses_until_throttled(&app, &email, "203.0.113.1").await,
        10
    );
    // The owner, from an address that has not been failing, gets in.
    assert_eq!(
        login_from(&app, &email, PASSWORD, owner).await.status(),
        StatusCode::OK
    );
    // The throttled address is refused even the right password, unchecked.
    assert_eq!(
        login_from(&app, &email, PASSWORD, "203.0.113.1")
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // Nine more addresses, ten guesses each: the account's budget (100 attempts in 15 minutes) is spent.
    for i in 2..=10 {
        let client = format!("203.0.113.{i}");
        assert_eq!(
            guesses_until_throttled(&app, &email, &client).await,
            10,
            "{client}"
        );
    }
    // Past it, an address that has not tried this account gets one guess, and no more.
    for i in 11..=12 {
        let client = format!("203.0.113.{i}");
        assert_eq!(
            guesses_until_throttled(&app, &email, &client).await,
            1,
            "{client}"
        );
        assert_eq!(
            login_from(&app, &email, PASSWORD, &client).await.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{client}"
        );
    }
    // And the owner still gets in, from the same address as before and from a new one.
    for client in [owner, "192.0.2.55"] {
        let response = login_from(&app, &email, PASSWORD, client).await;
        assert_eq!(response.status(), StatusCode::OK, "{client}");
        assert!(json(response).await["access_token"].is_string());
    }
    // Other accounts were never affected, from the attacking addresses either.
    let bystander = format!("bystander-{}@example.com", Uuid::new_v4());
    assert_eq!(app.register(&bystander).await.status(), StatusCode::CREATED);
    assert_eq!(
        login_from(&app, &bystander, PASSWORD, "203.0.113.1")
            .await
            .status(),
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn ended_windows_of_the_login_throttle_are_purged(pool: PgPool) {
    // No app: its own purge would race this one for the rows.
    sqlx::raw_sql(
        "insert into login_throttle_accounts (email, attempts, window_start) values
         ('old@example.com', 3, now() - interval '16 minutes'), ('new@example.com', 3, now());
         insert into login_throttle_clients (email, client, attempts, window_start) values
         ('old@example.com', '203.0.113.1', 3, now() - interval '16 minutes'),
         ('new@example.com', '203.0.113.1', 3, now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (_, logins) = api::startup::purge(&pool).await.unwrap();
    assert_eq!(logins, 2);
    for table in ["login_throttle_accounts", "login_throttle_clients"] {
        let emails: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select email from {table}")))
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(emails, ["new@example.com"], "{table}");
    }
}
