use futures_util::future::join_all;
use reqwest::{StatusCode, header};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{PASSWORD, TestApp, json, retry_after};

async fn login_from(app: &TestApp, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"email": "x@example.com", "password": PASSWORD}));
    if let Some(ip) = forwarded_for {
        request = request.header("X-Forwarded-For", ip);
    }
    request.send().await.unwrap()
}

/// The default limits, as a deployment gets them.
fn limited(config: &mut api::Config) {
    config.rate_limits =
        <api::Config as clap::Parser>::parse_from(["api", "--jwt-secret", "x"]).rate_limits;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_sixth_login_in_a_minute_is_refused_with_retry_after(pool: PgPool) {
    let app = TestApp::spawn_with(pool, limited).await;
    for attempt in 1..=5 {
        assert_eq!(
            login_from(&app, None).await.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let refused = login_from(&app, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = retry_after(&refused);
    assert!(
        (1..=12).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    assert!(
        refused.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(
        json(refused).await,
        json!({"detail": "Rate limit exceeded. Try again later."})
    );

    // Other routes have their own budgets.
    assert_eq!(
        app.register("ada@example.com").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        app.refresh("not-a-token").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.client
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_21st_order_created_in_a_minute_is_refused_with_retry_after(pool: PgPool) {
    let app = TestApp::spawn_with(pool, limited).await;
    let first = app.new_user().await;
    let second = app.new_user().await;
    let body = json!({"product_name": "Widget", "amount": 1});
    // A burst of 20, then one more every 3 s: the 21 creates below take a fraction of that.
    let created = join_all((0..20).map(|_| app.create_order(&first.access, &body))).await;
    for (i, response) in created.iter().enumerate() {
        assert_eq!(response.status(), StatusCode::CREATED, "create {}", i + 1);
    }
    let refused = app.create_order(&first.access, &body).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = retry_after(&refused);
    assert!((1..=3).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(
        json(refused).await,
        json!({"detail": "Rate limit exceeded. Try again later."})
    );
    assert_eq!(app.count("orders").await, 20);

    // The limit is the client's, not the user's: another account from the same address is refused too.
    assert_eq!(
        app.create_order(&second.access, &body).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(app.count("orders").await, 20);
    // Other routes have their own budgets.
    assert_eq!(
        app.get(&first.access, "/orders/my-orders").await.status(),
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_61st_read_of_an_order_in_a_minute_is_refused_with_retry_after(pool: PgPool) {
    let app = TestApp::spawn_with(pool, limited).await;
    let user = app.new_user().await;
    let order = app.create_widget(&user.access).await;
    let path = format!("/orders/{order}");
    // A burst of 60, then one more every second: polling an order once a second is never refused.
    let reads = join_all((0..60).map(|_| app.get(&user.access, &path))).await;
    for (i, response) in reads.iter().enumerate() {
        assert_eq!(response.status(), StatusCode::OK, "read {}", i + 1);
    }
    let refused = app.get(&user.access, &path).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!((1..=2).contains(&retry_after(&refused)));
    assert_eq!(
        json(refused).await,
        json!({"detail": "Rate limit exceeded. Try again later."})
    );
    // Unknown ids count too: the limit is the route's, not the order's.
    let other = format!("/orders/{}", uuid::Uuid::now_v7());
    assert_eq!(
        app.get(&user.access, &other).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Cancelling has its own budget.
    assert_eq!(
        app.cancel(&user.access, &order).await.status(),
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_forged_forwarded_for_does_not_reset_the_count(pool: PgPool) {
    let app = TestApp::spawn_with(pool, limited).await;
    for i in 0..5 {
        login_from(&app, Some(&format!("203.0.113.{i}"))).await;
    }
    assert_eq!(
        login_from(&app, Some("198.51.100.7")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn behind_a_trusted_proxy_the_rightmost_forwarded_address_is_the_client(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        limited(config);
        config.trust_proxy_hops = Some(1);
    })
    .await;
    for i in 0..5 {
        // The client forges the left entries; the proxy appends the real address on the right.
        login_from(&app, Some(&format!("10.9.9.{i}, 203.0.113.1"))).await;
    }
    assert_eq!(
        login_from(&app, Some("10.0.0.1, 203.0.113.1"))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        login_from(&app, Some("203.0.113.2")).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn behind_two_trusted_proxies_the_second_forwarded_address_from_the_right_is_the_client(
    pool: PgPool,
) {
    let app = TestApp::spawn_with(pool, |config| {
        limited(config);
        config.trust_proxy_hops = Some(2);
    })
    .await;
    for i in 0..5 {
        // Forged entries, then the client (appended by the outer proxy), then the outer proxy (by the inner one).
        login_from(&app, Some(&format!("10.9.9.{i}, 203.0.113.1, 192.0.2.{i}"))).await;
    }
    assert_eq!(
        login_from(&app, Some("10.0.0.1, 203.0.113.1, 192.0.2.9"))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same proxies has its own budget.
    assert_eq!(
        login_from(&app, Some("203.0.113.2, 192.0.2.1"))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_limit_set_to_zero_is_off(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        limited(config);
        config.rate_limits.rate_limit_login_per_minute = 0;
    })
    .await;
    for _ in 0..8 {
        assert_eq!(
            login_from(&app, None).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
}

/// Two api processes' worth of apps on one queue name (and so one set of shared limits).
async fn two_apps(pool: PgPool, adjust: impl Fn(&mut api::Config)) -> (TestApp, TestApp) {
    let first = TestApp::spawn_with(pool.clone(), &adjust).await;
    let queue_name = first.queue_name.clone();
    let second = TestApp::spawn_with(pool, |config| {
        adjust(config);
        config.queue.queue_name = queue_name;
    })
    .await;
    (first, second)
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_limit_holds_across_api_processes(pool: PgPool) {
    let (a, b) = two_apps(pool, limited).await;
    for attempt in 1..=5 {
        let app = if attempt % 2 == 0 { &b } else { &a };
        let response = login_from(app, None).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
        // Counted by every process together: 5 per minute, 5 - attempt left.
        assert_eq!(response.headers()["x-ratelimit-limit"], "5");
        assert_eq!(
            response.headers()["x-ratelimit-remaining"],
            (5 - attempt).to_string().as_str(),
            "attempt {attempt}"
        );
    }
    // The sixth goes to the app that has seen only two: the shared count refuses it.
    let refused = login_from(&b, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = retry_after(&refused);
    assert!(
        (1..=12).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    assert_eq!(
        json(refused).await,
        json!({"detail": "Rate limit exceeded. Try again later."})
    );
    assert_eq!(
        login_from(&a, None).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn with_shared_limits_off_each_process_counts_its_own(pool: PgPool) {
    let (a, b) = two_apps(pool, |config| {
        limited(config);
        config.rate_limits.rate_limit_shared = false;
    })
    .await;
    for attempt in 1..=5 {
        for app in [&a, &b] {
            assert_eq!(
                login_from(app, None).await.status(),
                StatusCode::UNAUTHORIZED,
                "attempt {attempt}"
            );
        }
    }
    assert_eq!(
        login_from(&a, None).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn with_redis_unreachable_each_process_still_holds_its_limit(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        limited(config);
        // Nothing listens there: every shared decision fails, and the process's own limiter decides.
        config.queue.redis_url = "redis://127.0.0.1:9/0".into();
    })
    .await;
    for attempt in 1..=5 {
        let response = login_from(&app, None).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let refused = login_from(&app, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&refused) >= 1);
    assert_eq!(
        json(refused).await,
        json!({"detail": "Rate limit exceeded. Try again later."})
    );
    let fallbacks = app.metric("rate_limit_local_decisions_total").await;
    assert!(fallbacks >= 6.0, "{fallbacks}");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn opening_streams_in_a_loop_is_rate_limited_over_both_event_routes(pool: PgPool) {
    let app = TestApp::spawn_with(pool, limited).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    // Opened and closed at once, each one reading the whole history: 30 a minute, both routes together.
    for n in 0..30 {
        let path = if n % 2 == 0 {
            "/orders/events".to_owned()
        } else {
            format!("/orders/{id}/events")
        };
        let response = reqwest::Client::new()
            .get(app.url(&path))
            .bearer_auth(&user.access)
            .header("Last-Event-ID", "0")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "stream {n}");
        drop(response);
    }
    let refused = reqwest::Client::new()
        .get(app.url("/orders/events"))
        .bearer_auth(&user.access)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&refused) >= 1);
    assert_eq!(
        json(refused).await,
        json!({"detail": "Rate limit exceeded. Try again later."})
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_user_opening_streams_from_many_addresses_is_rate_limited_as_one(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        limited(config);
        config.trust_proxy_hops = Some(1);
    })
    .await;
    let user = app.new_user().await;
    let open = |n: usize, token: &str| {
        reqwest::Client::new()
            .get(app.url("/orders/events"))
            .bearer_auth(token.to_owned())
            // Each from an address of its own: the limit per client never applies.
            .header(
                "X-Forwarded-For",
                format!("10.1.{}.{}", n / 250, n % 250 + 1),
            )
            .send()
    };
    for n in 0..30 {
        let response = open(n, &user.access).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "stream {n}");
    }
    let refused = open(30, &user.access).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&refused) >= 1);
    // Another user is not held back by it.
    let other = app.new_user().await;
    assert_eq!(
        open(31, &other.access).await.unwrap().status(),
        StatusCode::OK
    );
}
