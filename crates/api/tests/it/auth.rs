use futures_util::future::join_all;
use reqwest::{StatusCode, header};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{PASSWORD, TestApp, json};

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
    let tokens = app.new_user().await;
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("select token_hash from refresh_tokens")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].len(), 32);
    assert!(
        !stored[0]
            .windows(16)
            .any(|w| tokens.refresh.as_bytes().windows(16).any(|t| t == w))
    );
}
