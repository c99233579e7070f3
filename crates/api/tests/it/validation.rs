use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{PASSWORD, TestApp, assert_422_at, json};

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn malformed_orders_get_422_and_write_nothing(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let raw_cases = [
        ("{\"product_name\": \"Widget\", ", json!(["body", 28])),
        (
            "[{\"product_name\": \"Widget\", \"amount\": 1}]",
            json!(["body"]),
        ),
        ("\"just a string\"", json!(["body"])),
        (
            "{\"product_name\": \"Widget\", \"amount\": \"10\"}",
            json!(["body", "amount"]),
        ),
        (
            "{\"product_name\": 5, \"amount\": 10}",
            json!(["body", "product_name"]),
        ),
        (
            "{\"product_name\": \"Widget\", \"amount\": 10, \"status\": \"COMPLETED\"}",
            json!(["body", "status"]),
        ),
        ("{\"product_name\": \"Widget\"}", json!(["body", "amount"])),
        (
            "{\"product_name\": \"Widget\", \"amount\": 0}",
            json!(["body", "amount"]),
        ),
        (
            "{\"product_name\": \"Widget\", \"amount\": -1}",
            json!(["body", "amount"]),
        ),
        (
            "{\"product_name\": \"Widget\", \"amount\": 1.005}",
            json!(["body", "amount"]),
        ),
        (
            "{\"product_name\": \"Widget\", \"amount\": 1000000000.01}",
            json!(["body", "amount"]),
        ),
        (
            "{\"product_name\": \"Widget\", \"amount\": 1e400}",
            json!(["body", "amount"]),
        ),
        (
            "{\"product_name\": \"Widget\", \"amount\": null}",
            json!(["body", "amount"]),
        ),
        (
            "{\"product_name\": \"   \", \"amount\": 1}",
            json!(["body", "product_name"]),
        ),
        (
            "{\"product_name\": \"\", \"amount\": 1}",
            json!(["body", "product_name"]),
        ),
    ];
    for (body, loc) in raw_cases {
        let response = app
            .client
            .post(app.url("/orders/create"))
            .bearer_auth(&user.access)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        if loc.as_array().unwrap().len() == 2 && loc[1].is_number() {
            // A syntax error: its location is a column; only check the type.
            assert_eq!(
                json(response).await["detail"][0]["type"],
                "json_invalid",
                "{body}"
            );
        } else {
            assert_422_at(response, loc).await;
        }
    }
    let long_name = json!({"product_name": "x".repeat(201), "amount": 1});
    assert_422_at(
        app.create_order(&user.access, &long_name).await,
        json!(["body", "product_name"]),
    )
    .await;
    // Both problems are reported at once.
    let response = app
        .create_order(&user.access, &json!({"product_name": "", "amount": 0}))
        .await;
    assert_eq!(json(response).await["detail"].as_array().unwrap().len(), 2);
    assert_eq!(app.count("orders").await, 0);
    assert!(app.queued_order_ids().is_empty());
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_bad_idempotency_key_is_a_422(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    for key in ["has space", &"k".repeat(256)] {
        let response = app
            .client
            .post(app.url("/orders/create"))
            .bearer_auth(&user.access)
            .header("Idempotency-Key", key)
            .json(&json!({"product_name": "Widget", "amount": 1}))
            .send()
            .await
            .unwrap();
        assert_422_at(response, json!(["header", "idempotency-key"])).await;
    }
    assert_eq!(app.count("orders").await, 0);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn bad_query_and_path_parameters_are_422(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    for (query, loc) in [
        ("status=SHIPPED", json!(["query", "status"])),
        ("status=pending", json!(["query", "status"])),
        ("limit=0", json!(["query", "limit"])),
        ("limit=101", json!(["query", "limit"])),
        ("limit=-5", json!(["query", "limit"])),
        ("limit=ten", json!(["query", "limit"])),
        ("cursor=garbage", json!(["query", "cursor"])),
        ("cursor=", json!(["query", "cursor"])),
        // A well-formed cursor whose time PostgreSQL cannot represent.
        (
            "cursor=LTgwMDAwMDAwMDAwMDAwMDAwMDAuMDFhMjEwZTItMjRkZi03M2FiLThjOWUtMmFiY2U5OTE3ODA5",
            json!(["query", "cursor"]),
        ),
        (
            "status=PENDING&status=COMPLETED",
            json!(["query", "status"]),
        ),
    ] {
        let response = app
            .get(&user.access, &format!("/orders/my-orders?{query}"))
            .await;
        assert_422_at(response, loc).await;
    }
    for id in ["not-a-uuid", "123", "01a210e2-24df-73ab-8c9e"] {
        assert_422_at(
            app.get(&user.access, &format!("/orders/{id}")).await,
            json!(["path", "id"]),
        )
        .await;
        assert_422_at(app.cancel(&user.access, id).await, json!(["path", "id"])).await;
    }
    assert_eq!(
        app.get(&user.access, "/orders/my-orders?limit=100&unknown=1")
            .await
            .status(),
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn malformed_registrations_get_422_and_write_nothing(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let cases = [
        (
            json!({"name": "", "email": "a@example.com", "password": PASSWORD}),
            json!(["body", "name"]),
        ),
        (
            json!({"name": " ", "email": "a@example.com", "password": PASSWORD}),
            json!(["body", "name"]),
        ),
        (
            json!({"name": "x".repeat(101), "email": "a@example.com", "password": PASSWORD}),
            json!(["body", "name"]),
        ),
        (
            json!({"name": "Ada", "email": "not-an-email", "password": PASSWORD}),
            json!(["body", "email"]),
        ),
        (
            json!({"name": "Ada", "email": format!("{}@example.com", "a".repeat(250)), "password": PASSWORD}),
            json!(["body", "email"]),
        ),
        (
            json!({"name": "Ada", "email": "a@example.com", "password": "short"}),
            json!(["body", "password"]),
        ),
        (
            json!({"name": "Ada", "email": "a@example.com", "password": "p".repeat(129)}),
            json!(["body", "password"]),
        ),
        (
            json!({"name": "Ada", "email": "a@example.com"}),
            json!(["body", "password"]),
        ),
        (
            json!({"name": "Ada", "email": "a@example.com", "password": PASSWORD, "is_admin": true}),
            json!(["body", "is_admin"]),
        ),
        (
            json!({"name": 1, "email": "a@example.com", "password": PASSWORD}),
            json!(["body", "name"]),
        ),
    ];
    for (body, loc) in cases {
        assert_422_at(app.post_json("/auth/register", &body).await, loc).await;
    }
    assert_eq!(app.count("users").await, 0);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_body_that_is_not_json_is_415_and_a_huge_one_413(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let body = json!({"name": "Ada", "email": "a@example.com", "password": PASSWORD}).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = app
            .client
            .post(app.url("/auth/register"))
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert!(json(response).await["detail"].is_string());
    }
    let with_charset = app
        .client
        .post(app.url("/auth/register"))
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(with_charset.status(), StatusCode::CREATED);

    let huge = json!({"name": "Ada", "email": "b@example.com", "password": "x".repeat(70 * 1024)});
    let response = app.post_json("/auth/register", &huge).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(json(response).await["detail"].is_string());
    assert_eq!(app.count("users").await, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn every_problem_of_a_body_is_listed_in_one_422(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let problems = |body: Value| {
        let app = &app;
        let token = user.access.clone();
        async move {
            let response = app.create_order(&token, &body).await;
            assert_eq!(
                response.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{body}"
            );
            let body = json(response).await;
            body["detail"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["loc"].clone(), e["type"].as_str().unwrap().to_owned()))
                .collect::<Vec<_>>()
        }
    };
    let at = |field: &str, kind: &str| (json!(["body", field]), kind.to_owned());
    assert_eq!(
        problems(json!({})).await,
        [at("product_name", "missing"), at("amount", "missing")]
    );
    assert_eq!(
        problems(json!({"product_name": 7, "amount": 1.001, "colour": "red"})).await,
        [
            at("product_name", "string_type"),
            at("amount", "decimal_max_places"),
            at("colour", "extra_forbidden")
        ]
    );
    let response = app
        .post_json(
            "/auth/register",
            &json!({"name": " ", "email": "nope", "password": "short"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let locs: Vec<Value> = json(response).await["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["loc"].clone())
        .collect();
    assert_eq!(
        locs,
        [
            json!(["body", "name"]),
            json!(["body", "email"]),
            json!(["body", "password"])
        ]
    );
    assert_eq!(app.count("orders").await, 0);
}
