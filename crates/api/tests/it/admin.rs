//! The admin API of the operations console, through real HTTP against real PostgreSQL and Redis: who may use it
//! (roles, the console's cookie and its CSRF token), the search and its pages, the operator's actions and their
//! audit log, the workers, the overview and its stream, and `api users set-role`.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use clap::Parser as _;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    events::{Stream, statuses, with_worker},
    helpers::{PASSWORD, Registered, TestApp, database_url_of, json, redis_url},
};

/// A test app whose overview refreshes every 200 ms.
async fn spawn(pool: PgPool) -> TestApp {
    TestApp::spawn_with(pool, |config| config.admin_overview_refresh_ms = 200).await
}

/// A registered, logged-in user with `role`.
struct Member {
    id: Uuid,
    email: String,
    token: String,
}

/// Registers a user with `role` and logs them in.
async fn member(app: &TestApp, role: &str) -> Member {
    let Registered { id, email } = app.register_with_role(role).await;
    let login = app.login(&email, PASSWORD).await;
    assert_eq!(login.status(), StatusCode::OK);
    let token = json(login).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    Member { id, email, token }
}

/// Sends `method path` with `token` as Bearer (if any) and `body` as JSON (if any).
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> reqwest::Response {
    // A client without a total timeout: the overview's stream stays open.
    let mut request = reqwest::Client::new().request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.unwrap()
}

/// Sends `GET path` as the holder of `token`.
async fn get_as(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    send(app, Method::GET, path, Some(token), None).await
}

/// Sends `GET path` as the holder of `token`: the body, as JSON.
async fn get_json(app: &TestApp, token: &str, path: &str) -> Value {
    json(get_as(app, token, path).await).await
}

/// Sends `POST path` as the holder of `token`, with `body` as JSON (if any).
async fn post_as(
    app: &TestApp,
    token: &str,
    path: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    send(app, Method::POST, path, Some(token), body).await
}

/// Sends `POST /admin/orders/redrive` as the holder of `token`, with `body`.
async fn redrive(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    post_as(app, token, "/admin/orders/redrive", Some(body)).await
}

/// An order to insert straight into the database, bypassing the queue.
struct NewOrder {
    user: Uuid,
    product: &'static str,
    status: &'static str,
    created_at: chrono::DateTime<chrono::Utc>,
    /// Parked after its attempts ran out: 5 attempts, `parked_at` now and a last error.
    parked: bool,
}

impl NewOrder {
    /// A PENDING "Widget" of `user`, created now, not parked.
    fn of(user: Uuid) -> Self {
        Self {
            user,
            product: "Widget",
            status: "PENDING",
            created_at: chrono::Utc::now(),
            parked: false,
        }
    }
}

/// Inserts `order` straight into the database: its id.
async fn insert_order(db: &PgPool, order: NewOrder) -> Uuid {
    let NewOrder {
        user,
        product,
        status,
        created_at,
        parked,
    } = order;
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into orders (id, user_id, product_name, amount, status, created_at, updated_at, attempts, parked_at, last_error)
         values ($1, $2, $3, 5, $4::order_status, $5, $5, $6, case when $7 then now() end, case when $7 then 'boom' end)",
    )
    .bind(id)
    .bind(user)
    .bind(product)
    .bind(status)
    .bind(created_at)
    .bind(if parked { 5 } else { 0 })
    .bind(parked)
    .execute(db)
    .await
    .unwrap();
    id
}

/// Inserts a parked PENDING "Widget" of `user`: its id, as text.
async fn insert_parked(db: &PgPool, user: Uuid) -> String {
    let order = NewOrder {
        parked: true,
        ..NewOrder::of(user)
    };
    insert_order(db, order).await.to_string()
}

/// The admin routes: (method, path, whether it is an action, its body).
fn routes(order: &str, parked: &str) -> Vec<(Method, String, bool, Option<Value>)> {
    vec![
        (Method::GET, "/admin/me".into(), false, None),
        (Method::GET, "/admin/overview".into(), false, None),
        (Method::GET, "/admin/overview/events".into(), false, None),
        (Method::GET, "/admin/workers".into(), false, None),
        (Method::GET, "/admin/orders".into(), false, None),
        (Method::GET, "/admin/orders/count".into(), false, None),
        (Method::GET, format!("/admin/orders/{order}"), false, None),
        (
            Method::GET,
            format!("/admin/orders/{order}/events"),
            false,
            None,
        ),
        (Method::GET, "/admin/audit".into(), false, None),
        (
            Method::POST,
            "/admin/orders/redrive".into(),
            true,
            Some(json!({"ids": [parked]})),
        ),
        (
            Method::POST,
            format!("/admin/orders/{order}/cancel"),
            true,
            None,
        ),
    ]
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn every_admin_route_answers_each_role_as_it_may(pool: PgPool) {
    let app = spawn(pool).await;
    let customer = member(&app, "customer").await;
    let viewer = member(&app, "viewer").await;
    let operator = member(&app, "operator").await;
    let parked = insert_parked(&app.db, customer.id).await;
    let order = app.create_widget(&customer.token).await;
    for (method, path, action, body) in routes(&order, &parked) {
        let cases = [
            (None, StatusCode::UNAUTHORIZED),
            (Some(&customer.token), StatusCode::FORBIDDEN),
            (
                Some(&viewer.token),
                if action {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::OK
                },
            ),
            (Some(&operator.token), StatusCode::OK),
        ];
        for (token, expected) in cases {
            let response = send(
                &app,
                method.clone(),
                &path,
                token.map(String::as_str),
                body.as_ref(),
            )
            .await;
            let status = response.status();
            let content_type = response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            if status == StatusCode::OK && path.ends_with("/events") {
                assert_eq!(expected, StatusCode::OK, "{method} {path}: a stream");
                assert_eq!(content_type, "text/event-stream");
                continue;
            }
            let body = response.text().await.unwrap();
            assert_eq!(status, expected, "{method} {path}: {body}");
            assert_eq!(content_type, "application/json", "{method} {path}");
            let body: Value = serde_json::from_str(&body).unwrap();
            if status != StatusCode::OK {
                assert!(body["detail"].is_string(), "{method} {path}: {body}");
            }
        }
    }
    // The operator's cancel above went through; the customer's orders are otherwise untouched.
    let me = get_json(&app, &viewer.token, "/admin/me").await;
    assert_eq!(
        me,
        json!({"id": viewer.id, "email": viewer.email, "name": "Ada", "role": "viewer"})
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_console_cookie_reads_and_acts_only_with_the_csrf_token(pool: PgPool) {
    let app = spawn(pool).await;
    let operator = member(&app, "operator").await;
    let customer = member(&app, "customer").await;
    let order = app.create_widget(&customer.token).await;
    let cookie = |csrf: &str| format!("console_token={}; console_csrf={csrf}", operator.token);
    let client = reqwest::Client::new();

    let read = client
        .get(app.url("/admin/me"))
        .header(header::COOKIE, cookie("s3cret-csrf-value"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(json(read).await["role"], "operator");

    let cancel = format!("/admin/orders/{order}/cancel");
    for header_value in [None, Some("wrong-csrf-value"), Some("")] {
        let mut request = client
            .post(app.url(&cancel))
            .header(header::COOKIE, cookie("s3cret-csrf-value"));
        if let Some(value) = header_value {
            request = request.header("X-CSRF-Token", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{header_value:?}");
        assert!(
            json(response).await["detail"]
                .as_str()
                .unwrap()
                .contains("X-CSRF-Token")
        );
    }
    assert_eq!(
        status_of(&app.db, &order).await,
        "PENDING",
        "a refused request changed nothing"
    );

    let done = client
        .post(app.url(&cancel))
        .header(header::COOKIE, cookie("s3cret-csrf-value"))
        .header("X-CSRF-Token", "s3cret-csrf-value")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    assert_eq!(json(done).await["results"][0]["result"], "cancelled");

    // A bad token in the cookie is a 401, as a bad Bearer token is.
    let forged = client
        .get(app.url("/admin/me"))
        .header(header::COOKIE, "console_token=not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
}

/// An order the search test inserted: (id, user, product, status, days ago, parked).
type Inserted = (String, Uuid, &'static str, &'static str, i64, bool);

/// Every page of `GET path` (following the `Link` headers): the ids in the order served.
async fn all_pages(app: &TestApp, token: &str, path: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut next = Some(path.to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let response = get_as(app, token, &path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        next = response.headers().get(header::LINK).map(|link| {
            let link = link.to_str().unwrap();
            assert!(link.ends_with(">; rel=\"next\""), "{link}");
            link[1..link.find('>').unwrap()].to_owned()
        });
        let page = json(response).await;
        let page = page.as_array().unwrap();
        assert!(page.len() <= 2, "{path}: a page larger than its limit");
        ids.extend(page.iter().map(|entry| match &entry["id"] {
            Value::String(id) => id.clone(),
            id => id.to_string(),
        }));
        pages += 1;
        assert!(pages < 50, "{path}: too many pages");
    }
    ids
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_search_finds_by_each_key_and_pages_without_gaps_or_duplicates(pool: PgPool) {
    let app = spawn(pool).await;
    let viewer = member(&app, "viewer").await;
    let ada = member(&app, "customer").await;
    let bob = member(&app, "customer").await;
    let day = |n: i64| chrono::Utc::now() - chrono::Duration::days(n);
    // (user, product, status, days ago, parked)
    let rows = [
        (ada.id, "Widget blue", "COMPLETED", 9, false),
        (ada.id, "Widget red", "PENDING", 8, true),
        (bob.id, "Gadget", "CANCELLED", 7, false),
        (ada.id, "Widget", "PROCESSING", 6, false),
        (bob.id, "Wid_get 50%", "PENDING", 5, false),
        (bob.id, "Widget", "COMPLETED", 4, false),
        (ada.id, "Gadget", "PENDING", 3, true),
        (bob.id, "widget", "COMPLETED", 2, false),
        (ada.id, "Widget", "COMPLETED", 1, false),
    ];
    let mut orders: Vec<Inserted> = Vec::new();
    for (user, product, status, days, parked) in rows {
        let order = NewOrder {
            user,
            product,
            status,
            created_at: day(days),
            parked,
        };
        let id = insert_order(&app.db, order).await;
        orders.push((id.to_string(), user, product, status, days, parked));
    }
    // Newest first: the rows were inserted oldest first.
    let expect = |keep: &dyn Fn(&Inserted) -> bool| -> Vec<String> {
        orders
            .iter()
            .rev()
            .filter(|order| keep(order))
            .map(|order| order.0.clone())
            .collect()
    };
    let from = day(7) - chrono::Duration::hours(1);
    let to = day(2) - chrono::Duration::hours(1);
    let encode = |at: chrono::DateTime<chrono::Utc>| {
        form_urlencoded::byte_serialize(at.to_rfc3339().as_bytes()).collect::<String>()
    };
    let searches: Vec<(String, Vec<String>)> = vec![
        ("".into(), expect(&|_| true)),
        (format!("id={}", orders[3].0), vec![orders[3].0.clone()]),
        (
            format!("email={}", ada.email.to_uppercase()),
            expect(&|o| o.1 == ada.id),
        ),
        ("status=COMPLETED".into(), expect(&|o| o.3 == "COMPLETED")),
        ("status=PENDING".into(), expect(&|o| o.3 == "PENDING")),
        ("parked=true".into(), expect(&|o| o.5)),
        ("parked=false".into(), expect(&|o| !o.5)),
        (
            "product=Widget".into(),
            expect(&|o| o.2.starts_with("Widget")),
        ),
        // `_` and `%` are plain characters in a prefix.
        (
            "product=Wid_get%2050%25".into(),
            expect(&|o| o.2 == "Wid_get 50%"),
        ),
        ("product=Wid_".into(), expect(&|o| o.2.starts_with("Wid_"))),
        (
            format!("created_from={}&created_to={}", encode(from), encode(to)),
            expect(&|o| (3..=7).contains(&o.4)),
        ),
        (
            format!("email={}&status=PENDING&parked=true", bob.email),
            vec![],
        ),
        (
            format!("created_from={}&created_to={}", encode(to), encode(from)),
            vec![],
        ),
        (
            format!("email={}&product=Widget", ada.email),
            expect(&|o| o.1 == ada.id && o.2.starts_with("Widget")),
        ),
    ];
    for (query, expected) in searches {
        let found = all_pages(
            &app,
            &viewer.token,
            &format!("/admin/orders?limit=2&{query}"),
        )
        .await;
        let distinct: HashSet<&String> = found.iter().collect();
        assert_eq!(
            distinct.len(),
            found.len(),
            "{query}: duplicates in {found:?}"
        );
        assert_eq!(found, expected, "{query}");
        let counted = get_json(&app, &viewer.token, &format!("/admin/orders/count?{query}")).await;
        assert_eq!(
            counted,
            json!({"count": expected.len(), "more": false}),
            "{query}"
        );
    }

    let page = get_json(
        &app,
        &viewer.token,
        &format!("/admin/orders?id={}", orders[1].0),
    )
    .await;
    assert_eq!(page[0]["user_email"], ada.email);
    assert_eq!(page[0]["product_name"], "Widget red");
    assert_eq!(page[0]["attempts"], 5);
    assert!(page[0]["parked_at"].is_string());

    for (query, field) in [
        ("status=DONE", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=abc", "cursor"),
        ("id=nope", "id"),
        ("email=not-an-email", "email"),
        ("parked=maybe", "parked"),
        ("created_from=yesterday", "created_from"),
        ("created_to=-5000-01-01T00:00:00Z", "created_to"),
    ] {
        let response = get_as(&app, &viewer.token, &format!("/admin/orders?{query}")).await;
        crate::helpers::assert_422_at(response, json!(["query", field])).await;
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_detail_shows_the_worker_fields_and_the_timeline(pool: PgPool) {
    let app = TestApp::spawn_with(pool, with_worker(50)).await;
    let viewer = member(&app, "viewer").await;
    let customer = member(&app, "customer").await;
    let order = app.create_widget(&customer.token).await;
    let detail = wait_for(Duration::from_secs(10), || async {
        let detail = get_json(&app, &viewer.token, &format!("/admin/orders/{order}")).await;
        (detail["status"] == "COMPLETED").then_some(detail)
    })
    .await;
    assert_eq!(detail["user_email"], customer.email);
    assert_eq!(detail["attempts"], 1);
    assert!(detail["locked_by"].is_null() && detail["lease_until"].is_null());
    assert!(detail["enqueued_at"].is_string());
    assert!(detail["parked_at"].is_null() && detail["last_error"].is_null());
    let timeline = detail["timeline"].as_array().unwrap();
    let steps: Vec<&str> = timeline
        .iter()
        .map(|entry| entry["status"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["PROCESSING", "COMPLETED"]);
    assert!(
        timeline[0]["changed_by"]
            .as_str()
            .unwrap()
            .starts_with("worker-")
    );
    let missing = get_as(
        &app,
        &viewer.token,
        &format!("/admin/orders/{}", Uuid::now_v7()),
    )
    .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    crate::helpers::assert_422_at(
        get_as(&app, &viewer.token, "/admin/orders/nope").await,
        json!(["path", "id"]),
    )
    .await;
}

/// Polls `check` until it gives a value, or panics after `limit`.
async fn wait_for<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < limit, "not in {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status of the order `id`, as the database holds it.
async fn status_of(db: &PgPool, id: &str) -> String {
    sqlx::query_scalar("select status::text from orders where id = $1::uuid")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

/// Waits up to 10 s for the order `id` to be COMPLETED.
async fn wait_until_completed(db: &PgPool, id: &str) {
    wait_for(Duration::from_secs(10), || async {
        (status_of(db, id).await == "COMPLETED").then_some(())
    })
    .await;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_parked_order_redriven_through_the_api_completes_and_leaves_an_audit_entry(pool: PgPool) {
    let app = TestApp::spawn_with(pool, with_worker(50)).await;
    let operator = member(&app, "operator").await;
    let customer = member(&app, "customer").await;
    let parked = insert_parked(&app.db, customer.id).await;
    let done = app.create_widget(&customer.token).await;
    wait_until_completed(&app.db, &done).await;
    // The reconciler leaves a parked order alone.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(status_of(&app.db, &parked).await, "PENDING");

    let missing = Uuid::now_v7().to_string();
    let body = json!({"ids": [parked, done, missing, parked]});
    let response = redrive(&app, &operator.token, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json(response).await;
    assert_eq!(
        answer["results"],
        json!([
            {"id": parked, "result": "requeued", "status": "PENDING"},
            {"id": done, "result": "not_stuck", "status": "COMPLETED"},
            {"id": missing, "result": "not_found", "status": null},
        ])
    );
    assert_eq!(answer["pushed"], true);
    wait_until_completed(&app.db, &parked).await;
    let (attempts, parked_at): (i32, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("select attempts, parked_at from orders where id = $1::uuid")
            .bind(&parked)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((attempts, parked_at), (1, None));

    let audit = get_json(&app, &operator.token, "/admin/audit").await;
    let entry = &audit[0];
    assert_eq!(entry["id"], answer["audit_id"]);
    assert_eq!(entry["action"], "redrive");
    assert_eq!(entry["actor_id"], json!(operator.id));
    assert_eq!(entry["actor_email"], operator.email);
    assert_eq!(entry["order_ids"], json!([parked, done, missing]));
    assert_eq!(entry["request"], body);
    assert_eq!(entry["result"], answer["results"]);
    assert!(entry["at"].is_string());

    // By search: the filters are recorded as sent, and nothing is parked any more.
    let by_search = json!({"search": {"parked": true, "status": "PENDING"}});
    let answer = json(redrive(&app, &operator.token, &by_search).await).await;
    assert_eq!(answer["results"], json!([]));
    let audit = get_json(&app, &operator.token, "/admin/audit?limit=1").await;
    assert_eq!(audit[0]["request"], by_search);

    // More than 1,000 orders, neither or both keys, or a bad filter: 422, and nothing recorded.
    let too_many: Vec<String> = (0..1001).map(|_| Uuid::now_v7().to_string()).collect();
    for (body, loc) in [
        (json!({"ids": too_many}), json!(["body", "ids"])),
        (json!({"ids": []}), json!(["body", "ids"])),
        (json!({}), json!(["body", "ids"])),
        (
            json!({"ids": [parked], "search": {"parked": true}}),
            json!(["body", "search"]),
        ),
        (
            json!({"search": {"email": "nope"}}),
            json!(["body", "search", "email"]),
        ),
        (
            json!({"search": {"color": "red"}}),
            json!(["body", "search", "color"]),
        ),
        (json!({"search": [null, null]}), json!(["body", "search"])),
    ] {
        let response = redrive(&app, &operator.token, &body).await;
        crate::helpers::assert_422_at(response, loc).await;
    }
    assert_eq!(app.count("audit_log").await, 2);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_product_prefix_finds_the_same_orders_whether_it_covers_a_few_names_or_many(
    pool: PgPool,
) {
    let app = spawn(pool).await;
    let operator = member(&app, "operator").await;
    let customer = member(&app, "customer").await;
    // 40 product names (`Part 00` to `Part 39`), two orders each, their times interleaved across names, every
    // other one COMPLETED.
    sqlx::query(
        "insert into orders (id, user_id, product_name, amount, status, created_at)
         select gen_random_uuid(), $1, 'Part ' || lpad((n % 40)::text, 2, '0'), 1,
                case when n % 2 = 0 then 'COMPLETED' else 'PENDING' end::order_status,
                now() - n * interval '1 minute'
         from generate_series(1, 80) n",
    )
    .bind(customer.id)
    .execute(&app.db)
    .await
    .unwrap();
    // What each search must find, by the plainest query: newest first.
    let expected = |pattern: &'static str, status: Option<&'static str>| {
        sqlx::query_scalar::<_, Uuid>(
            "select id from orders where product_name like $1 and ($2::text is null or status::text = $2)
             order by created_at desc, id desc",
        )
        .bind(pattern)
        .bind(status)
        .fetch_all(&app.db)
    };
    // 40 names: past the few read apart; 10 names and 1 name: read apart (but not with a status of unfinished
    // orders, which has a small index of its own); none.
    let searches = [
        ("product=Part", "Part%", None),
        ("product=Part%201", "Part 1%", None),
        (
            "product=Part%201&status=COMPLETED",
            "Part 1%",
            Some("COMPLETED"),
        ),
        (
            "product=Part%201&status=PENDING",
            "Part 1%",
            Some("PENDING"),
        ),
        ("product=Part%2017", "Part 17%", None),
        ("product=Part%209", "Part 9%", None),
    ];
    for (query, pattern, status) in searches {
        let want: Vec<String> = expected(pattern, status)
            .await
            .unwrap()
            .iter()
            .map(Uuid::to_string)
            .collect();
        let found = all_pages(
            &app,
            &operator.token,
            &format!("/admin/orders?limit=2&{query}"),
        )
        .await;
        assert_eq!(found, want, "{query}");
    }
    // A re-drive of a search finds the same orders.
    let response = redrive(
        &app,
        &operator.token,
        &json!({"search": {"product": "Part 1"}}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let acted: Vec<String> = json(response).await["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| result["id"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = expected("Part 1%", None)
        .await
        .unwrap()
        .iter()
        .map(Uuid::to_string)
        .collect();
    assert_eq!(acted.len(), 20);
    assert_eq!(acted, want);
}

/// Inserts `n` PENDING "Bulk" orders of `user`, one a second back from now.
async fn insert_bulk(db: &PgPool, user: Uuid, n: i32) {
    sqlx::query(
        "insert into orders (id, user_id, product_name, amount, created_at)
         select gen_random_uuid(), $1, 'Bulk', 1, now() - n * interval '1 second' from generate_series(1, $2) n",
    )
    .bind(user)
    .bind(n)
    .execute(db)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_search_matching_more_than_1000_orders_is_refused_and_counted(pool: PgPool) {
    let app = spawn(pool).await;
    let operator = member(&app, "operator").await;
    let customer = member(&app, "customer").await;
    insert_bulk(&app.db, customer.id, 1001).await;
    let response = redrive(
        &app,
        &operator.token,
        &json!({"search": {"product": "Bulk"}}),
    )
    .await;
    crate::helpers::assert_422_at(response, json!(["body", "search"])).await;
    let since = (chrono::Utc::now() - chrono::Duration::seconds(500)).to_rfc3339();
    let body = json!({"search": {"product": "Bulk", "created_from": since}});
    let response = redrive(&app, &operator.token, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let results = json(response).await["results"].as_array().unwrap().len();
    assert!((498..=500).contains(&results), "{results}");

    // The count says so beforehand, and stops at 10,000.
    let counted = get_json(&app, &operator.token, "/admin/orders/count?product=Bulk").await;
    assert_eq!(counted, json!({"count": 1001, "more": false}));
    insert_bulk(&app.db, customer.id, 9000).await;
    let counted = get_json(&app, &operator.token, "/admin/orders/count?product=Bulk").await;
    assert_eq!(counted, json!({"count": 10000, "more": true}));
    crate::helpers::assert_422_at(
        get_as(&app, &operator.token, "/admin/orders/count?status=DONE").await,
        json!(["query", "status"]),
    )
    .await;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_operator_cancel_shows_on_the_orders_live_stream(pool: PgPool) {
    // No worker: the order stays PENDING until the operator cancels it.
    let app = spawn(pool).await;
    let operator = member(&app, "operator").await;
    let customer = member(&app, "customer").await;
    let id = app.create_widget(&customer.token).await;
    let mut stream =
        Stream::start(&app, &customer.token, &format!("/orders/{id}/events"), None).await;
    let first = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.status(), "PENDING");
    // A viewer watches it too, through the admin API, as the console's order page does.
    let viewer = member(&app, "viewer").await;
    let admin_events = format!("/admin/orders/{id}/events");
    let mut watching = Stream::start(&app, &viewer.token, &admin_events, None).await;
    let first = watching.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.status(), "PENDING");

    let cancel = format!("/admin/orders/{id}/cancel");
    let response = post_as(&app, &operator.token, &cancel, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json(response).await;
    assert_eq!(
        answer["results"],
        json!([{"id": id, "result": "cancelled", "status": "CANCELLED"}])
    );
    let rest = stream.rest().await;
    assert_eq!(statuses(&rest), ["CANCELLED"]);
    let seen = watching.rest().await;
    assert_eq!(statuses(&seen), ["CANCELLED"]);
    // Reconnecting after the last change: nothing more will come, and 204 says so.
    let last = seen[0].id.clone();
    let again = Stream::open(&app, &viewer.token, &admin_events, Some(&last)).await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);

    let detail = get_json(&app, &operator.token, &format!("/admin/orders/{id}")).await;
    assert_eq!(
        detail["timeline"][0]["changed_by"],
        format!("operator:{}", operator.email)
    );
    // Again: nothing to do, and said so.
    let again = json(post_as(&app, &operator.token, &cancel, None).await).await;
    assert_eq!(
        again["results"],
        json!([{"id": id, "result": "not_pending", "status": "CANCELLED"}])
    );
    let missing = post_as(
        &app,
        &operator.token,
        &format!("/admin/orders/{}/cancel", Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let audit = get_json(&app, &operator.token, "/admin/audit").await;
    let actions: Vec<(&str, &Value)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["action"].as_str().unwrap(),
                &entry["result"][0]["result"],
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("cancel", &json!("not_pending")),
            ("cancel", &json!("cancelled"))
        ]
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_audit_log_pages_newest_first_in_full_or_for_one_order(pool: PgPool) {
    let app = spawn(pool).await;
    let operator = member(&app, "operator").await;
    // Five actions; the first, third and fourth also name `shared`.
    let shared = Uuid::now_v7();
    let mut naming_shared = Vec::new();
    for n in 0..5 {
        let mut ids = vec![Uuid::now_v7()];
        if [0, 2, 3].contains(&n) {
            ids.push(shared);
        }
        let response = redrive(&app, &operator.token, &json!({ "ids": ids })).await;
        assert_eq!(response.status(), StatusCode::OK);
        let audit_id = json(response).await["audit_id"].as_i64().unwrap();
        if ids.contains(&shared) {
            naming_shared.push(audit_id);
        }
    }
    let audit_ids =
        |ids: Vec<String>| -> Vec<i64> { ids.iter().map(|id| id.parse().unwrap()).collect() };
    let ids = audit_ids(all_pages(&app, &operator.token, "/admin/audit?limit=2").await);
    let mut expected = ids.clone();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    expected.dedup();
    assert_eq!(ids.len(), 5);
    assert_eq!(ids, expected);

    // One order's entries, newest first, over pages whose links keep the filter.
    let path = format!("/admin/audit?order_id={shared}&limit=2");
    naming_shared.reverse();
    assert_eq!(
        audit_ids(all_pages(&app, &operator.token, &path).await),
        naming_shared
    );
    let none = get_json(
        &app,
        &operator.token,
        &format!("/admin/audit?order_id={}", Uuid::now_v7()),
    )
    .await;
    assert_eq!(none, json!([]));
    crate::helpers::assert_422_at(
        get_as(&app, &operator.token, "/admin/audit?order_id=nope").await,
        json!(["query", "order_id"]),
    )
    .await;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_demoted_operator_loses_access_at_once(pool: PgPool) {
    let app = spawn(pool).await;
    let operator = member(&app, "operator").await;
    let customer = member(&app, "customer").await;
    let order = app.create_widget(&customer.token).await;
    let me = get_as(&app, &operator.token, "/admin/me").await;
    assert_eq!(me.status(), StatusCode::OK);
    let mut overview = Stream::start(&app, &operator.token, "/admin/overview/events", None).await;
    assert_eq!(
        overview.next(Duration::from_secs(5)).await.unwrap().event,
        "overview"
    );
    let order_events = format!("/admin/orders/{order}/events");
    let mut watching = Stream::start(&app, &operator.token, &order_events, None).await;
    let first = watching.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.status(), "PENDING");

    app.set_role(&operator.email, "viewer").await;
    let cancel = format!("/admin/orders/{order}/cancel");
    let response = post_as(&app, &operator.token, &cancel, None).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        get_as(&app, &operator.token, "/admin/me").await.status(),
        StatusCode::OK
    );

    app.set_role(&operator.email, "customer").await;
    for path in ["/admin/me", "/admin/orders", "/admin/overview"] {
        let response = get_as(&app, &operator.token, path).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
    }
    // The open streams end within a role check's interval.
    let started = Instant::now();
    overview.time_to_end("the role").await;
    watching.time_to_end("the role").await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(status_of(&app.db, &order).await, "PENDING");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_overview_counts_the_orders_and_streams_each_refresh(pool: PgPool) {
    let app = spawn(pool).await;
    let viewer = member(&app, "viewer").await;
    let customer = member(&app, "customer").await;
    let now = chrono::Utc::now();
    for (status, parked) in [("PENDING", false), ("PENDING", true), ("PROCESSING", false)] {
        let order = NewOrder {
            status,
            created_at: now,
            parked,
            ..NewOrder::of(customer.id)
        };
        insert_order(&app.db, order).await;
    }
    // Finished orders are counted from their status changes, as the api and the worker record them.
    let cancelled = app.create_widget(&customer.token).await;
    assert_eq!(
        app.cancel(&customer.token, &cancelled).await.status(),
        StatusCode::OK
    );
    // Two completions 2 s and 4 s after their creation, recorded as the worker records them.
    for latency in [2, 4] {
        let order = NewOrder {
            created_at: now,
            ..NewOrder::of(customer.id)
        };
        let id = insert_order(&app.db, order).await;
        sqlx::query(
            "with done as (update orders set status = 'COMPLETED', created_at = now() - make_interval(secs => $2),
                                  updated_at = now() where id = $1 returning id)
             insert into order_status_history (order_id, status) select id, 'COMPLETED' from done",
        )
        .bind(id)
        .bind(f64::from(latency))
        .execute(&app.db)
        .await
        .unwrap();
    }
    let overview = wait_for(Duration::from_secs(10), || async {
        let overview = get_json(&app, &viewer.token, "/admin/overview").await;
        (overview["orders"]["COMPLETED"] == 2).then_some(overview)
    })
    .await;
    assert_eq!(
        overview["orders"],
        json!({"PENDING": 2, "PROCESSING": 1, "COMPLETED": 2, "CANCELLED": 1})
    );
    assert_eq!(overview["parked"], 1);
    assert_eq!(overview["backlog"]["postgres"], 1, "{overview}");
    // No worker runs: the job of the order created then cancelled through the api still waits in Redis.
    assert_eq!(overview["backlog"]["redis"], 1);
    assert_eq!(overview["refresh_ms"], 200);
    let minutes = overview["completed_per_minute"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    let completed: i64 = minutes
        .iter()
        .map(|m| m["completed"].as_i64().unwrap())
        .sum();
    assert_eq!(completed, 2);
    assert_eq!(overview["latency_ms"]["completed"], 2);
    let p50 = overview["latency_ms"]["p50"].as_f64().unwrap();
    assert!((2900.0..=3100.0).contains(&p50), "{p50}");
    let as_of: chrono::DateTime<chrono::Utc> = overview["as_of"].as_str().unwrap().parse().unwrap();
    assert!(chrono::Utc::now() - as_of < chrono::Duration::seconds(2));

    // A cancel made now shows in the next events of the stream.
    let mut stream = Stream::start(&app, &viewer.token, "/admin/overview/events", None).await;
    let first = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, "overview");
    assert_eq!(first.data["orders"]["CANCELLED"], 1);
    let id = app.create_widget(&customer.token).await;
    assert_eq!(
        app.cancel(&customer.token, &id).await.status(),
        StatusCode::OK
    );
    let started = Instant::now();
    loop {
        let event = stream.next(Duration::from_secs(5)).await.unwrap();
        assert_eq!(event.event, "overview");
        if event.data["orders"]["CANCELLED"] == 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn live_workers_are_listed_with_their_counts_and_vanish_when_they_stop(pool: PgPool) {
    let app = TestApp::spawn_with(pool.clone(), with_worker(20)).await;
    let viewer = member(&app, "viewer").await;
    let customer = member(&app, "customer").await;
    let order = app.create_widget(&customer.token).await;
    wait_until_completed(&app.db, &order).await;
    // A second worker process of the same queue, stopped below.
    let mut queue = worker::Config::parse_from(["worker"]).queue;
    queue.redis_url = redis_url();
    queue.queue_name = app.queue_name.clone();
    let mut settings = worker::Config::parse_from(["worker"]).worker;
    settings.worker_poll_interval_ms = 20;
    let stop = CancellationToken::new();
    let second = tokio::spawn(worker::run(settings, queue, pool.clone(), stop.clone()));

    let workers = wait_for(Duration::from_secs(10), || async {
        let workers = get_json(&app, &viewer.token, "/admin/workers").await;
        let done: u64 = workers
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["done"].as_u64().unwrap())
            .sum();
        (workers.as_array().unwrap().len() == 2 && done == 1).then_some(workers)
    })
    .await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default();
    for worker in workers.as_array().unwrap() {
        assert!(worker["id"].as_str().unwrap().starts_with("worker-"));
        assert_eq!(worker["host"], host.as_str());
        assert_eq!(worker["in_flight"], 0);
        assert!(
            worker["started_at"].as_str().unwrap() <= worker["last_heartbeat"].as_str().unwrap()
        );
    }
    stop.cancel();
    second.await.unwrap().unwrap();
    let workers = get_json(&app, &viewer.token, "/admin/workers").await;
    assert_eq!(workers.as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(workers[0]["done"], 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn api_users_set_role_changes_a_role_and_refuses_an_unknown_user_or_role(pool: PgPool) {
    let app = spawn(pool.clone()).await;
    let email = format!("first-operator-{}@example.com", Uuid::new_v4());
    assert_eq!(app.register(&email).await.status(), StatusCode::CREATED);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_api"))
            .args(args)
            .env("DATABASE_URL", database_url_of(&pool))
            .env("MIGRATE_ON_START", "false")
            .env_remove("JWT_SECRET")
            .output()
            .unwrap()
    };
    let made = run(&["users", "set-role", &email.to_uppercase(), "operator"]);
    assert!(made.status.success(), "{made:?}");
    assert_eq!(
        String::from_utf8_lossy(&made.stdout).trim(),
        format!("{email}: customer -> operator")
    );
    let role: String = sqlx::query_scalar("select role from users where email = $1")
        .bind(&email)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(role, "operator");
    let again = run(&["users", "set-role", &email, "operator"]);
    assert!(again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        format!("{email}: already operator")
    );

    let unknown_role = run(&["users", "set-role", &email, "admin"]);
    assert_eq!(unknown_role.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown_role.stderr).contains("unknown role \"admin\""));
    let unknown_user = run(&["users", "set-role", "nobody@example.com", "viewer"]);
    assert_eq!(unknown_user.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown_user.stderr)
            .contains("no user has the email nobody@example.com")
    );
    let help = run(&["users", "set-role", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("operator"));
}
