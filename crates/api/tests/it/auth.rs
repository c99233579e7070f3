use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{JWT_SECRET, PASSWORD, TestApp, json};

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn registering_returns_the_user_without_secrets(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let response = app
        .post_json(
            "/auth/register",
            &json!({"name": "  Ada Lovelace ", "email": "Ada@Example.COM", "password": PASSWORD}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = json(response).await;
    assert_eq!(body["name"], "Ada Lovelace");
    assert_eq!(body["email"], "ada@example.com");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
    );
    assert!(
        body["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        4,
        "unexpected fields: {body}"
    );
    let stored: String = sqlx::query_scalar("select password_hash from users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(
        stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{stored}"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_same_email_in_other_letter_case_is_taken(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    assert_eq!(
        app.register("ada@example.com").await.status(),
        StatusCode::CREATED
    );
    let response = app.register("ADA@example.com").await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(
        json(response).await,
        json!({"detail": "Email already registered"})
    );
    assert_eq!(app.count("users").await, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn login_returns_a_token_pair_and_the_refresh_cookie(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.register("ada@example.com").await;
    let response = app.login("ADA@example.com", PASSWORD).await;
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = json(response).await;
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 900);
    let refresh = body["refresh_token"].as_str().unwrap();
    assert!(
        cookie.starts_with(&format!("refresh_token={refresh};")),
        "{cookie}"
    );
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/auth"] {
        assert!(
            cookie.contains(attribute),
            "{attribute} missing from {cookie}"
        );
    }
    let me = app
        .get(body["access_token"].as_str().unwrap(), "/auth/me")
        .await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(json(me).await["email"], "ada@example.com");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_wrong_password_and_an_unknown_email_get_the_same_401(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.register("ada@example.com").await;
    for (email, password) in [
        ("ada@example.com", "wrong password"),
        ("nobody@example.com", PASSWORD),
    ] {
        let response = app.login(email, password).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            json(response).await,
            json!({"detail": "Invalid credentials"})
        );
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn protected_routes_answer_401_with_www_authenticate(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let no_token = app.client.get(app.url("/auth/me")).send().await.unwrap();
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(no_token.headers()[header::WWW_AUTHENTICATE], "Bearer");
    for bad in ["garbage", "a.b.c", ""] {
        let response = app.get(bad, "/auth/me").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "token {bad:?}");
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert!(json(response).await["detail"].is_string());
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_refresh_token_is_not_an_access_token_nor_the_reverse(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    assert_eq!(
        app.get(&tokens.refresh, "/auth/me").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.get(&tokens.refresh, "/orders/my-orders").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.refresh(&tokens.access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // The refresh token itself is still good: refusing it elsewhere did not burn it.
    assert_eq!(app.refresh(&tokens.refresh).await.status(), StatusCode::OK);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn refreshing_rotates_the_token_and_reuse_revokes_the_session(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let first = app.new_user().await;
    let response = app.refresh(&first.refresh).await;
    assert_eq!(response.status(), StatusCode::OK);
    let second = json(response).await;
    let second_refresh = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, first.refresh);
    assert_eq!(
        app.get(second["access_token"].as_str().unwrap(), "/auth/me")
            .await
            .status(),
        StatusCode::OK
    );

    // A second login of the same user: a separate session.
    let other_session = json(app.login_body_of_first_user(&first).await).await;

    // Replaying the rotated token: refused, and the whole session dies with it.
    assert_eq!(
        app.refresh(&first.refresh).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.refresh(&second_refresh).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // The other session is unaffected.
    let other_refresh = other_session["refresh_token"].as_str().unwrap();
    assert_eq!(app.refresh(other_refresh).await.status(), StatusCode::OK);
}

impl TestApp {
    /// Logs in again as the user that `tokens` belong to.
    async fn login_body_of_first_user(&self, tokens: &crate::helpers::Tokens) -> reqwest::Response {
        let me = json(self.get(&tokens.access, "/auth/me").await).await;
        self.login(me["email"].as_str().unwrap(), PASSWORD).await
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn of_ten_concurrent_refreshes_with_one_token_exactly_one_succeeds(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    let statuses: Vec<StatusCode> = join_all((0..10).map(|_| app.refresh(&tokens.refresh)))
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
            .filter(|s| **s == StatusCode::UNAUTHORIZED)
            .count(),
        9,
        "{statuses:?}"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn refresh_and_logout_accept_the_cookie_instead_of_a_body(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    let cookie = format!("refresh_token={}", tokens.refresh);
    let response = app
        .client
        .post(app.url("/auth/refresh"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let next = json(response).await;
    // A JSON null body also means "use the cookie".
    let cookie = format!("refresh_token={}", next["refresh_token"].as_str().unwrap());
    let response = app
        .client
        .post(app.url("/auth/refresh"))
        .header(header::COOKIE, &cookie)
        .header(header::CONTENT_TYPE, "application/json")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let next = json(response).await;
    let cookie = format!("refresh_token={}", next["refresh_token"].as_str().unwrap());
    let response = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(next["access_token"].as_str().unwrap())
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(
        response.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let again = app
        .client
        .post(app.url("/auth/refresh"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn logout_revokes_the_session_and_needs_an_access_token(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    let body = json!({"refresh_token": tokens.refresh});
    let anonymous = app.post_json("/auth/logout", &body).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.headers()[header::WWW_AUTHENTICATE], "Bearer");

    // Another user cannot end this session.
    let intruder = app.new_user().await;
    let response = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(&intruder.access)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let response = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(&tokens.access)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.refresh(&tokens.refresh).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let revoked: i64 =
        sqlx::query_scalar("select count(*) from refresh_tokens where revoked_at is not null")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(revoked, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn refresh_tokens_are_stored_only_as_hashes(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let login = app.new_user().await;
    let refreshed = app.refresh(&login.refresh).await;
    assert_eq!(refreshed.status(), StatusCode::OK);
    let rotated = json(refreshed).await;
    let refresh_tokens = [
        login.refresh.as_str(),
        rotated["refresh_token"].as_str().unwrap(),
    ];

    // Each refresh token issued (at login and at rotation) is stored as its SHA-256 and as nothing else: not
    // the token, nor a part of it such as its 32-byte signature, which with the claims its row holds in clear
    // (jti, user, expiry) would rebuild the token.
    let mut stored: Vec<Vec<u8>> = sqlx::query_scalar("select token_hash from refresh_tokens")
        .fetch_all(&app.db)
        .await
        .unwrap();
    let mut expected: Vec<Vec<u8>> = refresh_tokens
        .iter()
        .map(|token| Sha256::digest(token.as_bytes()).to_vec())
        .collect();
    stored.sort();
    expected.sort();
    assert_eq!(stored, expected);

    // And no token, in any form, is anywhere in the database: every row of every table, as text (where a
    // bytea shows as hex).
    let tables: Vec<String> = sqlx::query_scalar(
        "select format('%I.%I', table_schema, table_name) from information_schema.tables
         where table_schema not in ('pg_catalog', 'information_schema') and table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(
        tables.iter().any(|t| t == "public.refresh_tokens"),
        "{tables:?}"
    );
    let mut dump = String::new();
    for table in &tables {
        let rows: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select string_agg(t::text, E'\\n') from {table} t"
        )))
        .fetch_one(&app.db)
        .await
        .unwrap();
        dump.push_str(&rows.unwrap_or_default());
        dump.push('\n');
    }
    let tokens = [
        ("the first access token", login.access.as_str()),
        ("the first refresh token", refresh_tokens[0]),
        (
            "the second access token",
            rotated["access_token"].as_str().unwrap(),
        ),
        ("the second refresh token", refresh_tokens[1]),
    ];
    for (what, token) in tokens {
        let signature = token.rsplit('.').next().unwrap();
        let signature_bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
        for (form, needle) in [
            ("as text", token.to_owned()),
            ("as bytes", hex(token.as_bytes())),
            ("its signature", signature.to_owned()),
            ("its signature's bytes", hex(&signature_bytes)),
        ] {
            assert!(
                !dump.contains(&needle),
                "{what} is in the database ({form})"
            );
        }
    }
}

/// Lower-case hex, the way PostgreSQL prints a bytea.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Signs `claims` the way the test app signs its tokens (HS256, its secret), so that a token made here differs
/// from one the app issued only in what the test chose.
pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// The claims the app puts in a `typ` token for `user`, expiring at `exp` (seconds since the epoch) and issued a
/// minute before that or before now, whichever is first.
pub fn claims(user: Uuid, typ: &str, exp: i64) -> Value {
    json!({
        "sub": user,
        "iat": exp.min(Utc::now().timestamp()) - 60,
        "exp": exp,
        "jti": Uuid::now_v7(),
        "typ": typ,
        "iss": "orders-api",
    })
}

async fn user_id(app: &TestApp, access_token: &str) -> Uuid {
    let me = app.get(access_token, "/auth/me").await;
    assert_eq!(me.status(), StatusCode::OK);
    json(me).await["id"].as_str().unwrap().parse().unwrap()
}

/// A 401 in the contract's shape: `WWW-Authenticate: Bearer` and `{"detail": "<message>"}`.
async fn assert_401(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(
        response.headers().get(header::WWW_AUTHENTICATE).unwrap(),
        "Bearer",
        "{what}"
    );
    let body = json(response).await;
    assert!(
        body.as_object().is_some_and(|o| o.len() == 1)
            && body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{what}: {body}"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_expired_access_token_is_refused_with_401(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = user_id(&app, &app.new_user().await.access).await;
    let now = Utc::now().timestamp();
    // A token made here is accepted while it is live: the refusals below are down to its expiry alone.
    let live = sign(&claims(user, "access", now + 600));
    assert_eq!(app.get(&live, "/auth/me").await.status(), StatusCode::OK);
    assert_eq!(
        app.get(&live, "/orders/my-orders").await.status(),
        StatusCode::OK
    );

    // Expired an hour ago, and a few seconds ago: there is no grace period (the JWT library's default is 60 s,
    // which would stretch every access token's life by a minute).
    for (when, exp) in [("an hour ago", now - 3600), ("5 s ago", now - 5)] {
        let expired = sign(&claims(user, "access", exp));
        assert_401(
            app.get(&expired, "/auth/me").await,
            &format!("/auth/me, expired {when}"),
        )
        .await;
        assert_401(
            app.get(&expired, "/orders/my-orders").await,
            &format!("/orders/my-orders, expired {when}"),
        )
        .await;
        assert_401(
            app.create_order(&expired, &json!({"product_name": "Widget", "amount": 1}))
                .await,
            &format!("/orders/create, expired {when}"),
        )
        .await;
    }
    assert_eq!(app.count("orders").await, 0);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_expired_refresh_token_is_refused_with_401(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let login = app.new_user().await;
    let user = user_id(&app, &login.access).await;
    let now = Utc::now().timestamp();
    // A refresh token made here, stored as a sibling of the one the login issued: a copy of that token's row
    // (same session, same user), with the new token's jti as its id, its hash, and an expiry that is the
    // token's own `exp` unless the test says otherwise.
    let store = async |exp: i64, stored_expiry: i64| {
        let claims = claims(user, "refresh", exp);
        let token = sign(&claims);
        let changes = json!({
            "id": claims["jti"],
            "token_hash": format!("\\x{}", hex(&Sha256::digest(token.as_bytes()))),
            "expires_at": DateTime::<Utc>::from_timestamp(stored_expiry, 0).unwrap(),
        });
        let inserted = sqlx::query(
            "insert into refresh_tokens
             select (jsonb_populate_record(t, $1)).* from refresh_tokens t where t.token_hash = $2",
        )
        .bind(changes)
        .bind(Sha256::digest(login.refresh.as_bytes()).to_vec())
        .execute(&app.db)
        .await
        .unwrap();
        assert_eq!(inserted.rows_affected(), 1);
        token
    };
    let live = store(now + 3600, now + 3600).await;
    let expired = store(now - 5, now - 5).await;
    let expired_but_stored_as_live = store(now - 5, now + 3600).await;
    let live_but_stored_as_expired = store(now + 3600, now - 5).await;

    // The control: such a token is good while it is live.
    let response = app.refresh(&live).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(json(response).await["access_token"].is_string());

    for (what, token) in [
        ("a refresh token expired 5 s ago", &expired),
        (
            "an expired refresh token whose row is still live",
            &expired_but_stored_as_live,
        ),
        (
            "a refresh token whose row has expired",
            &live_but_stored_as_expired,
        ),
    ] {
        assert_401(app.refresh(token).await, what).await;
    }
    // Of the tokens made here, only the live one was exchanged.
    let used: i64 =
        sqlx::query_scalar("select count(*) from refresh_tokens where used_at is not null")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(used, 1);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_access_token_of_a_deleted_user_is_refused_with_401(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    let order = app.create_widget(&tokens.access).await;
    let user = user_id(&app, &tokens.access).await;

    // The user's sessions and orders go with the row (on delete cascade); the access token stays a valid JWT.
    sqlx::query("delete from users where id = $1")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(app.count("orders").await, 0);
    assert_eq!(app.count("refresh_tokens").await, 0);

    let token = tokens.access.as_str();
    assert_401(app.get(token, "/auth/me").await, "/auth/me").await;
    assert_401(
        app.get(token, "/orders/my-orders").await,
        "/orders/my-orders",
    )
    .await;
    assert_401(
        app.get(token, &format!("/orders/{order}")).await,
        "/orders/{id}",
    )
    .await;
    assert_401(app.cancel(token, &order).await, "/orders/{id}/cancel").await;
    assert_401(
        app.create_order(token, &json!({"product_name": "Widget", "amount": 1}))
            .await,
        "/orders/create",
    )
    .await;
    assert_401(app.refresh(&tokens.refresh).await, "/auth/refresh").await;
    assert_eq!(app.count("orders").await, 0);
}

/// How many connections to the test's database wait for a lock (a row, a transaction, an advisory lock).
async fn waiting_for_locks(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database() and wait_event_type = 'Lock'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// Returns once `n` connections to the test's database wait for a lock.
async fn until_waiting_for_locks(db: &PgPool, n: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while waiting_for_locks(db).await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {n} requests ever waited for a lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Which request ends the session while a refresh in it is under way.
#[derive(Clone, Copy, Debug)]
enum Revocation {
    /// A logout with the token being refreshed.
    Logout,
    /// The session's used first token presented again.
    Reuse,
}

/// A refresh of a session's second token and a `revocation` of that session, in the order that let the session
/// live on before refreshes and revocations took the session's lock: the refresh takes the token's row, then the
/// revocation starts, then the refresh commits its next token. However they interleave, the session ends: the
/// revocation gets its answer, and the token the refresh issued is refused, in PostgreSQL's eyes and the streams'.
async fn race_a_refresh_against(app: &TestApp, revocation: Revocation) {
    let login = app.new_user().await;
    // The session's second token (its first is used): the one the refresh presents.
    let renewed = json(app.refresh(&login.refresh).await).await;
    let access = renewed["access_token"].as_str().unwrap().to_owned();
    let refresh = renewed["refresh_token"].as_str().unwrap().to_owned();
    let hash = Sha256::digest(refresh.as_bytes()).to_vec();
    let session: Uuid =
        sqlx::query_scalar("select family_id from refresh_tokens where token_hash = $1")
            .bind(&hash)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let mut stream = crate::events::Stream::start(app, &access, "/orders/events", None).await;

    // Hold the presented token's row, so that both requests queue behind it: the refresh first, then the other.
    let mut holder = app.db.begin().await.unwrap();
    sqlx::query("select 1 from refresh_tokens where token_hash = $1 for update")
        .bind(&hash)
        .execute(&mut *holder)
        .await
        .unwrap();
    let refreshing = tokio::spawn(
        app.client
            .post(app.url("/auth/refresh"))
            .json(&json!({"refresh_token": refresh}))
            .send(),
    );
    until_waiting_for_locks(&app.db, 1).await;
    let (revoking, revoked_status) = match revocation {
        Revocation::Logout => (
            app.client
                .post(app.url("/auth/logout"))
                .bearer_auth(&access)
                .json(&json!({"refresh_token": refresh})),
            StatusCode::NO_CONTENT,
        ),
        Revocation::Reuse => (
            app.client
                .post(app.url("/auth/refresh"))
                .json(&json!({"refresh_token": login.refresh})),
            StatusCode::UNAUTHORIZED,
        ),
    };
    let revoking = tokio::spawn(revoking.send());
    until_waiting_for_locks(&app.db, 2).await;
    holder.rollback().await.unwrap();

    let refreshed = refreshing.await.unwrap().unwrap();
    let revoked = revoking.await.unwrap().unwrap();
    assert_eq!(revoked.status(), revoked_status, "{revocation:?}");
    // The refresh went first, so it got a pair; the revocation ended the session all the same.
    assert_eq!(refreshed.status(), StatusCode::OK, "{revocation:?}");
    let next = json(refreshed).await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_401(
        app.refresh(&next).await,
        &format!("the refresh token issued during the {revocation:?}"),
    )
    .await;
    let ended = orders_core::db::sessions::ended_sessions(&app.db, &[session])
        .await
        .unwrap();
    assert_eq!(ended, [session], "{revocation:?}: the session is not over");
    // And the stream opened in it ends, as after any revocation.
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.rest())
        .await
        .expect("the session's stream ends");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_refresh_racing_a_logout_cannot_keep_the_session_alive(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    race_a_refresh_against(&app, Revocation::Logout).await;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_refresh_racing_a_reuse_cannot_keep_the_session_alive(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    race_a_refresh_against(&app, Revocation::Reuse).await;
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn logout_stays_idempotent_after_the_revoked_session_is_purged(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let tokens = app.new_user().await;
    let logout = |access: String| {
        let request = app
            .client
            .post(app.url("/auth/logout"))
            .bearer_auth(access)
            .json(&json!({"refresh_token": tokens.refresh}));
        async move { request.send().await.unwrap() }
    };
    assert_eq!(
        logout(tokens.access.clone()).await.status(),
        StatusCode::NO_CONTENT
    );
    // Again while the revoked rows are there.
    assert_eq!(
        logout(tokens.access.clone()).await.status(),
        StatusCode::NO_CONTENT
    );
    // Again once the purge has deleted them.
    let (purged, _) = api::startup::purge(&app.db).await.unwrap();
    assert_eq!(purged, 1);
    assert_eq!(app.count("refresh_tokens").await, 0);
    let response = logout(tokens.access.clone()).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(
        response.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    // The session stays over, and the token is still nobody else's to present.
    assert_401(
        app.refresh(&tokens.refresh).await,
        "refresh after the purge",
    )
    .await;
    let intruder = app.new_user().await;
    assert_401(logout(intruder.access).await, "another user's purged token").await;
    // A refresh token that never was this service's is refused as before.
    assert_401(
        app.client
            .post(app.url("/auth/logout"))
            .bearer_auth(&tokens.access)
            .json(&json!({"refresh_token": "not.a.token"}))
            .send()
            .await
            .unwrap(),
        "a forged token",
    )
    .await;
}
