//! TLS to PostgreSQL through rustls: `sslmode` in `DATABASE_URL` is honoured. The local Debian server has TLS on
//! with its default (self-signed "snakeoil") certificate.

use reqwest::StatusCode;
use sqlx::PgPool;

use crate::helpers::{TestApp, database_url_of, test_config};

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn with_sslmode_require_every_connection_of_the_api_is_encrypted(db: PgPool) {
    let mut config = test_config();
    config.database.database_url = format!(
        "{}?sslmode=require&application_name=orders-api-tls-test",
        database_url_of(&db)
    );
    config.database.migrate_on_start = false;
    let tls = orders_core::db::connect(&config.database)
        .await
        .expect("connects with sslmode=require");
    let app = TestApp::spawn(tls.clone()).await;
    let user = app.new_user().await;
    let id = app.create_widget(&user.access).await;
    assert_eq!(
        app.get(&user.access, &format!("/orders/{id}"))
            .await
            .status(),
        StatusCode::OK
    );
    // Seen from the server: every connection the api's pool opened (named by its application_name) is a TLS one.
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where s.ssl), count(*) filter (where not s.ssl)
         from pg_stat_activity a join pg_stat_ssl s using (pid)
         where a.datname = current_database() and a.application_name = 'orders-api-tls-test'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(encrypted >= 1, "no connection of the api's pool seen");
    assert_eq!(plain, 0, "plain connections in the api's pool");
    // The control: with sslmode=disable the same server is reached in plain text.
    let mut plain_config = test_config();
    plain_config.database.database_url = format!("{}?sslmode=disable", database_url_of(&db));
    plain_config.database.migrate_on_start = false;
    let plain_pool = orders_core::db::connect(&plain_config.database)
        .await
        .unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            .fetch_one(&plain_pool)
            .await
            .unwrap();
    assert!(!ssl);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn sslmode_verify_full_refuses_a_certificate_no_trusted_authority_signed(db: PgPool) {
    let mut config = test_config();
    config.database.database_url = format!("{}?sslmode=verify-full", database_url_of(&db));
    config.database.migrate_on_start = false;
    let refused = orders_core::db::connect(&config.database).await;
    let err = refused.expect_err("the snakeoil certificate must not be trusted");
    let chain = format!("{err:#}");
    assert!(
        chain.to_lowercase().contains("certificate") || chain.to_lowercase().contains("tls"),
        "{chain}"
    );
}
