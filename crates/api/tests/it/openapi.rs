use std::collections::BTreeMap;

use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::{
    events::{SseEvent, Stream},
    helpers::{TestApp, json},
};

const SNAPSHOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/it/snapshots/openapi.json"
);

/// The document is generated from the routes; this snapshot makes every change to the contract visible in
/// review. After an intended change, refresh it with `UPDATE_SNAPSHOTS=1 cargo test -p api openapi`.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_openapi_document_matches_the_snapshot(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let response = get(&app, "/openapi.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut document = json(response).await;
    // Fresh in each copy (see `swagger_ui_suggests_a_fresh_idempotency_key_at_each_load`).
    *idempotency_key_example(&mut document) = json!("(a fresh UUID in each copy)");
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

/// Sends `GET path`, without credentials.
async fn get(app: &TestApp, path: &str) -> Response {
    app.client.get(app.url(path)).send().await.unwrap()
}

/// The body of `GET path`, as text.
async fn text_of(app: &TestApp, path: &str) -> String {
    let response = get(app, path).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    response.text().await.unwrap()
}

/// The example of the create route's `Idempotency-Key` header.
fn idempotency_key_example(document: &mut Value) -> &mut Value {
    document["paths"]["/orders/create"]["post"]["parameters"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|param| param["name"] == "Idempotency-Key")
        .expect("the create route declares Idempotency-Key")
        .get_mut("example")
        .expect("Idempotency-Key has an example")
}

/// Swagger UI fills "Try it out" with the examples: each load of the page gets a new key, so that Execute makes
/// one order however often it is pressed, and a reload makes the next one.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn swagger_ui_suggests_a_fresh_idempotency_key_at_each_load(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let mut keys = Vec::new();
    for _ in 0..2 {
        let response = get(&app, "/openapi.json").await;
        assert_eq!(response.headers()["cache-control"], "no-store");
        let mut document = json(response).await;
        let key = idempotency_key_example(&mut document)
            .as_str()
            .unwrap()
            .to_owned();
        let uuid = uuid::Uuid::parse_str(&key).expect("the suggested key is a UUID");
        assert_eq!(uuid.get_version_num(), 4, "{key}");
        keys.push(key);
    }
    assert_ne!(keys[0], keys[1], "each copy has its own key");
}

/// Swagger UI lists operations in the document's order: the routes come as a newcomer uses them, tags too.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_document_lists_routes_in_the_order_people_use_them(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let text = text_of(&app, "/openapi.json").await;
    let in_order = [
        "/auth/register",
        "/auth/login",
        "/auth/me",
        "/auth/refresh",
        "/auth/logout",
        "/orders/create",
        "/orders/my-orders",
        "/orders/{id}",
        "/orders/{id}/cancel",
        "/orders/{id}/events",
        "/orders/events",
        "/orders/events/cookie",
    ];
    let at: Vec<usize> = in_order
        .iter()
        .map(|path| {
            text.find(&format!("\"{path}\":{{"))
                .unwrap_or_else(|| panic!("{path} missing"))
        })
        .collect();
    assert!(at.is_sorted(), "paths out of order: {in_order:?} at {at:?}");
    let document: Value = serde_json::from_str(&text).unwrap();
    let tags: Vec<&str> = document["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tag| tag["name"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["auth", "orders", "health", "admin"]);
}

/// The examples Swagger UI shows and sends are true to their route, and run after the README's walkthrough
/// without a clash: their own account (register, then log in with the same password), a cancel that shows
/// CANCELLED, and 422 examples that name a field or parameter of their own route. Authorization survives a reload.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn swagger_ui_examples_are_true_to_each_route(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let document = app.openapi().await;
    let schemas = &document["components"]["schemas"];
    let register = &schemas["RegisterRequest"]["properties"];
    let login = &schemas["LoginRequest"]["properties"];
    assert_ne!(
        register["email"]["example"], "ada@example.com",
        "the README's walkthrough registers ada@example.com"
    );
    assert_eq!(register["email"]["example"], login["email"]["example"]);
    assert_eq!(
        register["password"]["example"],
        login["password"]["example"]
    );
    // The examples are accepted as they are: register, then log in.
    let body = |properties: &Value| -> Value {
        properties
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, schema)| (name.clone(), schema["example"].clone()))
            .collect()
    };
    for (path, properties, status) in [
        ("/auth/register", register, StatusCode::CREATED),
        ("/auth/login", login, StatusCode::OK),
    ] {
        let response = app.post_json(path, &body(properties)).await;
        assert_eq!(response.status(), status, "{path}");
    }

    let cancelled = &document["paths"]["/orders/{id}/cancel"]["patch"]["responses"]["200"]["content"]
        ["application/json"]["example"];
    assert_eq!(cancelled["status"], "CANCELLED");

    let mut checked = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let Some(example) =
                operation["responses"]["422"]["content"]["application/json"].get("example")
            else {
                continue;
            };
            // The body's schema, or the one of its `oneOf` that is not `null` (an optional body); the fields of a
            // body that is one of several shapes (a `oneOf` of objects) are those of every shape.
            let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
            let body_fields: Vec<String> = std::iter::once(schema)
                .chain(schema["oneOf"].as_array().into_iter().flatten())
                .find_map(|schema| schema["$ref"].as_str())
                .and_then(|reference| reference.rsplit('/').next())
                .map(|name| {
                    std::iter::once(&schemas[name])
                        .chain(schemas[name]["oneOf"].as_array().into_iter().flatten())
                        .filter_map(|shape| shape["properties"].as_object())
                        .flat_map(|properties| properties.keys().cloned())
                        .collect()
                })
                .unwrap_or_default();
            for problem in example["detail"].as_array().unwrap() {
                let (place, name) = (
                    problem["loc"][0].as_str().unwrap(),
                    problem["loc"][1].as_str().unwrap(),
                );
                let known = if place == "body" {
                    body_fields.iter().any(|field| field == name)
                } else {
                    operation["parameters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|param| param["in"] == place && param["name"].as_str() == Some(name))
                };
                assert!(
                    known,
                    "{method} {path}: its 422 example names {place} {name}, which it does not take"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} 422 examples");

    let initializer = text_of(&app, "/docs/swagger-initializer.js").await;
    assert!(
        initializer.contains("\"persistAuthorization\": true"),
        "{initializer}"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_openapi_document_covers_every_route_and_the_bearer_scheme(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let document = app.openapi().await;
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
        ("/orders/{id}/events", "get"),
        ("/orders/events", "get"),
        ("/orders/events/cookie", "post"),
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

/// `#/components/schemas/...` references resolved, once.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.strip_prefix("#/components/schemas/").unwrap();
            &document["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// The schema of each kind of event (`event:`) that the stream at `template` documents, by kind.
fn documented_events<'a>(document: &'a Value, template: &str) -> BTreeMap<String, &'a Value> {
    let content = &document["paths"][template]["get"]["responses"]["200"]["content"];
    let media = &content["text/event-stream"];
    // OpenAPI 3.2's form for an event stream: each event described by `itemSchema`, no schema for the whole body
    // (which a reader would take for the schema of each event, or of a JSON array of them).
    assert!(media.get("schema").is_none(), "{template}: {media}");
    let item = resolve(document, &media["itemSchema"]);
    let kinds: Vec<&Value> = match item["oneOf"].as_array() {
        Some(kinds) => kinds.iter().map(|kind| resolve(document, kind)).collect(),
        None => vec![item],
    };
    kinds
        .into_iter()
        .map(|kind| {
            let names = kind["properties"]["event"]["enum"].as_array().unwrap();
            assert_eq!(names.len(), 1, "{kind}");
            (names[0].as_str().unwrap().to_owned(), kind)
        })
        .collect()
}

/// Every event of the stream at `path` (resumed after `last_event_id`, if any) until the app ends it.
async fn events_until_end(
    app: &TestApp,
    token: &str,
    path: &str,
    last_event_id: Option<&str>,
) -> Vec<SseEvent> {
    Stream::start(app, token, path, last_event_id)
        .await
        .rest()
        .await
}

/// Fails unless `event` is one `schema` describes: its fields, an id that is a whole number, and its data the JSON
/// object of the schema's `contentSchema`, with every required field and no other.
fn assert_conforms(document: &Value, schema: &Value, event: &SseEvent) {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|field| field.as_str().unwrap())
        .collect();
    assert_eq!(required, ["event", "id", "data"], "{schema}");
    assert_eq!(schema["additionalProperties"], false);
    assert!(
        !event.id.is_empty() && event.id.bytes().all(|digit| digit.is_ascii_digit()),
        "{event:?}"
    );
    let data = &schema["properties"]["data"];
    assert_eq!(
        (&data["type"], &data["contentMediaType"]),
        (&json!("string"), &json!("application/json"))
    );
    let content = resolve(document, &data["contentSchema"]);
    let fields = event.data.as_object().unwrap();
    for field in content["required"].as_array().unwrap() {
        assert!(
            fields.contains_key(field.as_str().unwrap()),
            "{field} missing in {event:?}"
        );
    }
    for field in fields.keys() {
        assert!(
            content["properties"].get(field).is_some(),
            "{field} of {event:?} is not in {content}"
        );
    }
}

/// The event routes describe each event they send: every event of a real stream (the order's `status`, a
/// `status` replayed on the stream of all my orders, and its `reset` after a `Last-Event-ID` too far back) is of a
/// kind its route documents, in the documented shape; and the routes document no kind they never send.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_event_routes_document_every_event_they_send(pool: PgPool) {
    let app = TestApp::spawn_with(pool.clone(), |config| {
        config.sse_max_stream_seconds = Some(1);
    })
    .await;
    let document = app.openapi().await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    let order_path = format!("/orders/{id}/events");
    let mut sent = events_until_end(&app, &user.access, &order_path, None).await;
    // 1,001 changes since event 0: more than a stream replays, so a resume from 0 starts with `reset`.
    sqlx::query(
        "insert into order_status_history (order_id, status)
         select $1::uuid, 'PROCESSING' from generate_series(1, 1001)",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    let mut mine = events_until_end(&app, &user.access, "/orders/events", Some("0")).await;
    assert_eq!(mine.len(), 1);
    assert_eq!(app.cancel(&user.access, &id).await.status(), StatusCode::OK);
    let resume = mine[0].id.clone();
    mine.extend(events_until_end(&app, &user.access, "/orders/events", Some(&resume)).await);
    sent.extend(events_until_end(&app, &user.access, &order_path, Some(&resume)).await);
    let kinds = |events: &[SseEvent]| -> Vec<String> {
        events.iter().map(|event| event.event.clone()).collect()
    };
    assert_eq!(kinds(&sent), ["status", "status"]);
    assert_eq!(kinds(&mine), ["reset", "status"]);

    for (template, events) in [("/orders/{id}/events", &sent), ("/orders/events", &mine)] {
        let documented = documented_events(&document, template);
        let mut documented_kinds: Vec<&String> = documented.keys().collect();
        let mut sent_kinds: Vec<String> = kinds(events);
        sent_kinds.sort();
        sent_kinds.dedup();
        documented_kinds.sort();
        assert_eq!(
            documented_kinds,
            sent_kinds.iter().collect::<Vec<_>>(),
            "{template}"
        );
        for event in events.iter() {
            assert_conforms(&document, documented[&event.event], event);
        }
    }
}
