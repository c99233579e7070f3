use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, json};

fn widget() -> Value {
    json!({"product_name": "Widget", "amount": 19.99})
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn creating_an_order_stores_it_pending_and_queues_its_job(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let response = app
        .create_order(
            &user.access,
            &json!({"product_name": " Widget ", "amount": 999999999.99}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let order = json(response).await;
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["product_name"], "Widget");
    assert_eq!(order["amount"], json!(999999999.99));
    let id = order["id"].as_str().unwrap();
    assert_eq!(app.queued_order_ids(), vec![id.to_owned()]);
    let (amount, enqueued): (String, bool) = sqlx::query_as(
        "select amount::text, enqueued_at is not null from orders where id = $1::uuid",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((amount.as_str(), enqueued), ("999999999.99", true));

    let fetched = app.get(&user.access, &format!("/orders/{id}")).await;
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(json(fetched).await, order);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn every_created_order_gets_its_own_job(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.create_widget(&user.access).await);
    }
    let mut queued = app.queued_order_ids();
    queued.sort();
    ids.sort();
    assert_eq!(queued, ids);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn another_users_order_is_not_found(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.new_user().await;
    let other = app.new_user().await;
    let id = app.create_widget(&owner.access).await;
    for response in [
        app.get(&other.access, &format!("/orders/{id}")).await,
        app.cancel(&other.access, &id).await,
    ] {
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(json(response).await, json!({"detail": "Order not found"}));
    }
    let missing = Uuid::now_v7();
    assert_eq!(
        app.get(&owner.access, &format!("/orders/{missing}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.cancel(&owner.access, &missing.to_string())
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    // The owner's order is untouched.
    let order = json(app.get(&owner.access, &format!("/orders/{id}")).await).await;
    assert_eq!(order["status"], "PENDING");
    let listed = json(app.get(&other.access, "/orders/my-orders").await).await;
    assert_eq!(listed, json!([]));
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_cancelled_order_cannot_be_cancelled_again(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    let response = app.cancel(&user.access, &id).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json(response).await["status"], "CANCELLED");
    let again = app.cancel(&user.access, &id).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(
        json(again).await,
        json!({"detail": "Only pending orders can be cancelled"})
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn orders_that_left_pending_cannot_be_cancelled(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    for status in ["PROCESSING", "COMPLETED"] {
        let id = app.create_widget(&user.access).await;
        sqlx::query("update orders set status = $1::order_status where id = $2::uuid")
            .bind(status)
            .bind(&id)
            .execute(&app.db)
            .await
            .unwrap();
        assert_eq!(
            app.cancel(&user.access, &id).await.status(),
            StatusCode::CONFLICT,
            "{status}"
        );
        assert_eq!(
            json(app.get(&user.access, &format!("/orders/{id}")).await).await["status"],
            status
        );
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn of_concurrent_cancels_of_one_order_exactly_one_wins(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    let statuses: Vec<StatusCode> = join_all((0..10).map(|_| app.cancel(&user.access, &id)))
        .await
        .iter()
        .map(|r| r.status())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        9,
        "{statuses:?}"
    );
}

impl TestApp {
    async fn create_with_key(&self, token: &str, key: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/orders/create"))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_repeated_idempotency_key_returns_the_first_order(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let first = app.create_with_key(&user.access, "key-1", &widget()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first = json(first).await;
    let repeat = app
        .create_with_key(
            &user.access,
            "key-1",
            &json!({"product_name": "Widget", "amount": 19.990}),
        )
        .await;
    assert_eq!(repeat.status(), StatusCode::OK);
    assert_eq!(json(repeat).await, first);

    let different = app
        .create_with_key(
            &user.access,
            "key-1",
            &json!({"product_name": "Gadget", "amount": 19.99}),
        )
        .await;
    assert_eq!(different.status(), StatusCode::CONFLICT);
    assert_eq!(
        json(different).await,
        json!({"detail": "Idempotency-Key was used with a different request"})
    );

    // Keys are per user: another user's identical key creates their own order.
    let other = app.new_user().await;
    assert_eq!(
        app.create_with_key(&other.access, "key-1", &widget())
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(app.count("orders").await, 2);
    assert_eq!(
        app.queued_order_ids().len(),
        2,
        "a repeat must not queue another job"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn ten_concurrent_requests_with_one_key_create_one_order(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let body = widget();
    let responses =
        join_all((0..10).map(|_| app.create_with_key(&user.access, "same-key", &body))).await;
    let statuses: Vec<StatusCode> = responses.iter().map(|r| r.status()).collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        9,
        "{statuses:?}"
    );
    let ids: std::collections::HashSet<String> = join_all(responses.into_iter().map(json))
        .await
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("orders").await, 1);
}

/// Follows `Link: rel="next"` from `first` to the end; returns the ids seen, page by page.
async fn walk(app: &TestApp, token: &str, first: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut next = Some(first.to_owned());
    while let Some(path) = next.take() {
        let response = app.get(token, &path).await;
        assert_eq!(response.status(), StatusCode::OK);
        next = response.headers().get(header::LINK).map(|link| {
            let link = link.to_str().unwrap();
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            link[1..link.find('>').unwrap()].to_owned()
        });
        let page: Vec<Value> = response.json().await.unwrap();
        assert!(!page.is_empty() || pages.is_empty());
        pages.push(page);
        assert!(pages.len() < 50, "pagination does not end");
    }
    pages
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn pagination_walks_every_order_once_newest_first(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = app.new_user().await;
    let other = app.new_user().await;
    app.create_order(&other.access, &widget()).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let order = json(
            app.create_order(
                &user.access,
                &json!({"product_name": format!("P{i}"), "amount": 1}),
            )
            .await,
        )
        .await;
        created.push(order["id"].as_str().unwrap().to_owned());
    }
    let cancelled: Vec<String> = created.iter().step_by(3).cloned().collect();
    for id in &cancelled {
        assert_eq!(app.cancel(&user.access, id).await.status(), StatusCode::OK);
    }

    let pages = walk(&app, &user.access, "/orders/my-orders?limit=3").await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    let all: Vec<Value> = pages.into_iter().flatten().collect();
    let ids: Vec<String> = all
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect();
    let mut newest_first = created.clone();
    newest_first.reverse();
    assert_eq!(ids, newest_first);
    let times: Vec<&str> = all
        .iter()
        .map(|o| o["created_at"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    let pages = walk(
        &app,
        &user.access,
        "/orders/my-orders?status=CANCELLED&limit=2",
    )
    .await;
    let ids: Vec<String> = pages
        .into_iter()
        .flatten()
        .map(|o| {
            assert_eq!(o["status"], "CANCELLED");
            o["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut expected = cancelled.clone();
    expected.reverse();
    assert_eq!(ids, expected);

    let pending = json(
        app.get(&user.access, "/orders/my-orders?status=PENDING")
            .await,
    )
    .await;
    assert_eq!(pending.as_array().unwrap().len(), 7 - cancelled.len());
    let default_page = app.get(&user.access, "/orders/my-orders").await;
    assert!(default_page.headers().get(header::LINK).is_none());
    assert_eq!(json(default_page).await.as_array().unwrap().len(), 7);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn with_redis_unreachable_orders_are_still_created_and_left_for_the_reconciler(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        config.queue.redis_url = "redis://127.0.0.1:1/0".into();
    })
    .await;
    let user = app.new_user().await;
    let started = Instant::now();
    let response = app.create_order(&user.access, &widget()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(started.elapsed() < Duration::from_secs(5));
    let id = json(response).await["id"].as_str().unwrap().to_owned();
    let (status, enqueued): (String, bool) = sqlx::query_as(
        "select status::text, enqueued_at is not null from orders where id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((status.as_str(), enqueued), ("PENDING", false));

    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = json(ready).await;
    assert!(body["detail"].as_str().unwrap().contains("Redis"), "{body}");
    assert_eq!(body["postgres"], "ok");
}

#[tokio::test]
async fn with_postgres_unreachable_requests_answer_503_quickly() {
    let mut config = crate::helpers::test_config();
    config.database.database_url = "postgres://postgres@127.0.0.1:1/orders".into();
    config.database.database_acquire_timeout_ms = 1000;
    let db = orders_core::db::connect_lazy(&config.database).unwrap();
    let app = TestApp::spawn_with(db, |c| *c = config).await;

    let started = Instant::now();
    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = json(ready).await;
    assert!(
        body["detail"].as_str().unwrap().contains("PostgreSQL"),
        "{body}"
    );
    assert_eq!(body["redis"], "ok");

    let register = app.register("ada@example.com").await;
    assert_eq!(register.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        json(register).await,
        json!({"detail": "Service unavailable"})
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn health_endpoints_and_docs_answer(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let root = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(root.status(), StatusCode::OK);
    assert!(json(root).await["msg"].is_string());
    assert_eq!(
        app.client
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let docs = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
    let unknown = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(json(unknown).await, json!({"detail": "Not Found"}));
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_batch_insert_answers_each_order_and_skips_repeated_keys(pool: PgPool) {
    use orders_core::{
        db::orders::{NewOrder, insert_order, insert_orders},
        domain::{Amount, IdempotencyKey, ProductName, UserId},
    };
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    let me = json(app.get(&tokens.access, "/auth/me").await).await;
    let user = UserId(me["id"].as_str().unwrap().parse().unwrap());
    let name = |s: &str| ProductName::parse(s).unwrap();
    let amount = Amount::parse_json_number("5.25").unwrap();
    let key = |k: &str| Some(IdempotencyKey::parse(k).unwrap());
    let earlier = insert_order(
        &app.db,
        &NewOrder::new(user, name("Earlier"), amount, key("taken"), false),
    )
    .await
    .unwrap()
    .unwrap();

    let batch = vec![
        NewOrder::new(user, name("A"), amount, key("k1"), true),
        NewOrder::new(user, name("B"), amount, None, false),
        NewOrder::new(user, name("C"), amount, key("k1"), true),
        NewOrder::new(user, name("D"), amount, key("taken"), true),
        NewOrder::new(user, name("E"), amount, None, true),
    ];
    let answers = insert_orders(&app.db, &batch).await.unwrap();
    let names: Vec<Option<&str>> = answers
        .iter()
        .map(|order| order.as_ref().map(|order| order.product_name.as_str()))
        .collect();
    // The first of two orders with one key wins; a key used before wins nothing.
    assert_eq!(names, [Some("A"), Some("B"), None, None, Some("E")]);
    for (new, answer) in batch.iter().zip(&answers) {
        if let Some(order) = answer {
            assert_eq!(order.id, new.id);
            assert_eq!(order.user_id, user);
            assert_eq!(order.amount, amount.value());
        }
    }
    // One statement, one transaction: the batch shares its creation time.
    let created: Vec<_> = answers.iter().flatten().map(|o| o.created_at).collect();
    assert!(created.iter().all(|at| *at == created[0]));
    assert!(created[0] > earlier.created_at);
    let rows: Vec<(String, Option<String>, bool)> = sqlx::query_as(
        "select product_name, idempotency_key, enqueued_at is not null from orders order by product_name",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("A".to_owned(), Some("k1".to_owned()), true),
            ("B".to_owned(), None, false),
            ("E".to_owned(), None, true),
            ("Earlier".to_owned(), Some("taken".to_owned()), false),
        ]
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn concurrent_creates_share_a_statement_and_a_gone_user_fails_only_its_own(pool: PgPool) {
    // A pool of 2: one statement slot for creates, so that requests queue behind a blocked insert.
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let app = TestApp::spawn(small).await;
    let alive = app.new_user().await;
    let gone = app.new_user().await;
    let gone_id: Uuid = json(app.get(&gone.access, "/auth/me").await).await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    sqlx::query("delete from users where id = $1")
        .bind(gone_id)
        .execute(&pool)
        .await
        .unwrap();

    // Hold the inserts: the first one blocks in the statement slot, the others wait in the batcher.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("lock table orders in exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    let body = widget();
    let requests = join_all((0..30).map(|i| {
        let token = if i % 10 == 0 {
            &gone.access
        } else {
            &alive.access
        };
        app.create_order(token, &body)
    }));
    let release = async {
        loop {
            let blocked: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and query like '%insert into orders%'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            if blocked > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Time for the other requests to reach the batcher (each needs only its token checked).
        tokio::time::sleep(Duration::from_secs(1)).await;
        lock.rollback().await.unwrap();
    };
    let (responses, ()) = tokio::join!(requests, release);

    let mut created = Vec::new();
    for (i, response) in responses.into_iter().enumerate() {
        if i % 10 == 0 {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "request {i}");
        } else {
            assert_eq!(response.status(), StatusCode::CREATED, "request {i}");
            created.push(json(response).await["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(app.count("orders").await, 27);
    let mut queued = app.queued_order_ids();
    queued.sort();
    created.sort();
    assert_eq!(queued, created, "each created order queued exactly once");
    // The batch behind the blocked insert failed on the gone user's rows and was retried order by order, so
    // every order got one statement of its own; without the gone user the batch is one statement.
    let responses = {
        let mut lock = pool.begin().await.unwrap();
        sqlx::query("lock table orders in exclusive mode")
            .execute(&mut *lock)
            .await
            .unwrap();
        let requests = join_all((0..20).map(|_| app.create_order(&alive.access, &body)));
        let release = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            lock.rollback().await.unwrap();
        };
        tokio::join!(requests, release).0
    };
    assert!(responses.iter().all(|r| r.status() == StatusCode::CREATED));
    let batches: i64 = sqlx::query_scalar(
        "select count(distinct created_at) from orders where created_at > (select max(created_at) from orders where id = any($1::uuid[]))",
    )
    .bind(created.iter().map(|id| id.parse::<Uuid>().unwrap()).collect::<Vec<_>>())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(batches <= 2, "20 creates took {batches} statements");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_batch_of_page_requests_answers_each_as_its_own_query_would(pool: PgPool) {
    use orders_core::{
        db::orders::{OrderCursor, PageRequest, insert_orders_in_bulk, list_pages},
        domain::{Amount, OrderId, OrderStatus, ProductName, UserId},
    };
    let app = TestApp::spawn(pool).await;
    let mut users = Vec::new();
    for _ in 0..2 {
        let tokens = app.new_user().await;
        let me = json(app.get(&tokens.access, "/auth/me").await).await;
        users.push(UserId(me["id"].as_str().unwrap().parse().unwrap()));
    }
    let name = ProductName::parse("Widget").unwrap();
    let amount = Amount::parse_json_number("1.50").unwrap();
    for &user in &users {
        // Two statements: orders of one statement share their creation time, so ids break the ties.
        for _ in 0..2 {
            insert_orders_in_bulk(&app.db, user, &name, amount, 20)
                .await
                .unwrap();
        }
    }
    sqlx::query("update orders set status = 'CANCELLED' where id in (select id from orders order by random() limit 25)")
        .execute(&app.db)
        .await
        .unwrap();
    let reference = |request: PageRequest| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>(
                "select id from orders where user_id = $1 and ($2::text is null or status::text = $2)
                   and ($3::timestamptz is null or (created_at, id) < ($3, $4))
                 order by created_at desc, id desc limit $5",
            )
            .bind(request.user_id.0)
            .bind(request.status.map(OrderStatus::as_str))
            .bind(request.cursor.map(|c| c.created_at))
            .bind(request.cursor.map(|c| c.id.0))
            .bind(request.limit)
            .fetch_all(&db)
            .await
            .unwrap()
        }
    };
    let first = reference(PageRequest {
        user_id: users[0],
        status: None,
        cursor: None,
        limit: 15,
    })
    .await;
    let (at, id): (chrono::DateTime<chrono::Utc>, Uuid) =
        sqlx::query_as("select created_at, id from orders where id = $1")
            .bind(first[14])
            .fetch_one(&app.db)
            .await
            .unwrap();
    let cursor = Some(OrderCursor {
        created_at: at,
        id: OrderId(id),
    });
    let requests = [
        (users[0], None, None, 15),
        (users[1], Some(OrderStatus::Pending), None, 7),
        (users[0], None, cursor, 100),
        (users[1], None, None, 100),
        (users[0], Some(OrderStatus::Cancelled), None, 100),
        (users[0], Some(OrderStatus::Pending), cursor, 3),
        (users[1], Some(OrderStatus::Completed), None, 10),
    ]
    .map(|(user_id, status, cursor, limit)| PageRequest {
        user_id,
        status,
        cursor,
        limit,
    });
    let pages = list_pages(&mut app.db.acquire().await.unwrap(), &requests)
        .await
        .unwrap();
    assert_eq!(pages.len(), requests.len());
    for (request, page) in requests.iter().zip(&pages) {
        let ids: Vec<Uuid> = page.iter().map(|order| order.id.0).collect();
        assert_eq!(ids, reference(*request).await, "{request:?}");
        assert!(page.iter().all(|order| order.user_id == request.user_id));
    }
    assert_eq!(pages[2].len(), 25, "the rest of the first user's 40 orders");
    assert!(pages[6].is_empty());
}

/// The page batcher keeps its connection between statements, out of the pool; idle, it goes back to the pool.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_kept_connection_goes_back_to_the_pool_once_idle(pool: PgPool) {
    use orders_core::db::KeptConnections;
    let kept = KeptConnections::new(pool.clone());
    let mut conn = kept.take().await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let in_pool = pool.size();
    kept.give_back(conn);
    assert_eq!(kept.idle(), 1);
    assert_eq!(
        pool.num_idle(),
        in_pool as usize - 1,
        "kept, not in the pool"
    );

    // The next statement gets the same connection.
    let mut conn = kept.take().await.unwrap();
    let again: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(again, pid);
    kept.give_back(conn);

    // A second later it is back in the pool (the pool pings it on the way).
    let deadline = Instant::now() + Duration::from_secs(10);
    while kept.idle() > 0 || pool.num_idle() < in_pool as usize {
        assert!(
            Instant::now() < deadline,
            "an idle kept connection stayed out of the pool"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pool.size(), in_pool, "returned, not closed");
}
