//! TLS through rustls: `sslmode` in `DATABASE_URL` is honoured (the local Debian server has TLS on with its
//! default, self-signed "snakeoil" certificate), and `rediss://` in `REDIS_URL` reaches a Redis that speaks only
//! TLS, started by the test.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use sqlx::PgPool;

use crate::helpers::{ApiProcess, KillOnDrop, TestApp, database_url_of, json, test_config};

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

/// A Redis of its own that speaks only TLS, on a free port, with a certificate signed by a CA made for the test
/// (openssl's command line). Stopped and removed on drop.
struct TlsRedis {
    dir: std::path::PathBuf,
    port: u16,
    server: KillOnDrop,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("orders-tls-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl runs");
            assert!(status.success(), "openssl {args:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=orders test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("san.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "san.cnf",
            "-out",
            "server.pem",
        ]);
        // A port the system just handed out and took back: Redis cannot pick its TLS port itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_arg = port.to_string();
        let server = KillOnDrop(
            Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port_arg,
                    "--bind",
                    "127.0.0.1",
                    "--tls-cert-file",
                    "server.pem",
                    "--tls-key-file",
                    "server.key",
                    "--tls-ca-cert-file",
                    "ca.pem",
                    "--tls-auth-clients",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs (Debian's is built with TLS)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the TLS Redis did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { dir, port, server }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.server.0.kill();
        let _ = self.server.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The api binary with its in-process worker, on `redis_url`; `ca` is the only root it trusts for Redis's TLS.
fn spawn_api(db: &PgPool, redis_url: &str, ca: Option<&std::path::Path>) -> ApiProcess {
    ApiProcess::spawn(&database_url_of(db), |command| {
        command
            .env("REDIS_URL", redis_url)
            .env("WITH_WORKER", "true")
            .env("ORDER_STAGE_DELAY_MS", "0")
            .env_remove("SSL_CERT_DIR")
            // Without a CA, an empty bundle: no root at all is trusted.
            .env(
                "SSL_CERT_FILE",
                ca.map_or("/dev/null".as_ref(), std::path::Path::as_os_str),
            );
    })
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn over_rediss_orders_are_queued_and_completed_through_a_tls_redis(db: PgPool) {
    let redis = TlsRedis::start();
    let url = format!("rediss://localhost:{}/0", redis.port);
    let api = spawn_api(&db, &url, Some(&redis.ca()));
    let base = api.base.clone();
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "{}",
        ready.text().await.unwrap()
    );
    let token = api.register_and_login(&client, "ada@example.com").await;
    let id: uuid::Uuid = api.create_widget(&client, &token).await.parse().unwrap();
    // The job went through the TLS Redis: the in-process worker fetched it from there and completed the order.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: String = sqlx::query_scalar("select status::text from orders where id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
        if status == "COMPLETED" {
            break;
        }
        assert!(Instant::now() < deadline, "order still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pushed_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select enqueued_at from orders where id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        pushed_at.is_some(),
        "the order was pushed at creation, not by the reconciler"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_tls_redis_whose_certificate_no_trusted_root_signed_is_refused(db: PgPool) {
    let redis = TlsRedis::start();
    let url = format!("rediss://localhost:{}/0", redis.port);
    let api = spawn_api(&db, &url, None);
    let ready = reqwest::get(format!("{}/health/ready", api.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = json(ready).await;
    assert_eq!(body["redis"], "unavailable", "{body}");
    assert_eq!(body["postgres"], "ok", "{body}");
}
