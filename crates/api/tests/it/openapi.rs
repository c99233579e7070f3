use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{TestApp, json};

const SNAPSHOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/it/snapshots/openapi.json"
);

/// The document is generated from the routes; this snapshot makes every change to the contract visible in
/// review. After an intended change, refresh it with `UPDATE_SNAPSHOTS=1 cargo test -p api openapi`.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_openapi_document_matches_the_snapshot(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let document = json(response).await;
    let pretty = serde_json::to_string_pretty(&document).unwrap() + "\n";
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(SNAPSHOT, &pretty).unwrap();
    }
    let snapshot = std::fs::read_to_string(SNAPSHOT).unwrap_or_default();
    assert!(
        pretty == snapshot,
        "openapi.json differs from {SNAPSHOT}; if intended, rerun with UPDATE_SNAPSHOTS=1"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_openapi_document_covers_every_route_and_the_bearer_scheme(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let document = json(
        app.client
            .get(app.url("/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().unwrap();
    for (path, method) in [
        ("/", "get"),
        ("/health/live", "get"),
        ("/health/ready", "get"),
        ("/auth/register", "post"),
        ("/auth/login", "post"),
        ("/auth/refresh", "post"),
        ("/auth/logout", "post"),
        ("/auth/me", "get"),
        ("/orders/create", "post"),
        ("/orders/my-orders", "get"),
        ("/orders/{id}", "get"),
        ("/orders/{id}/cancel", "patch"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let protected = &paths["/orders/create"]["post"];
    assert_eq!(protected["security"][0]["bearer"], Value::Array(vec![]));
    for status in ["201", "200", "401", "409", "422", "429", "503"] {
        assert!(
            protected["responses"].get(status).is_some(),
            "create lacks {status}"
        );
    }
}
