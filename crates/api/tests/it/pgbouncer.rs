//! The api behind PgBouncer, as the README's "PgBouncer" paragraph describes it: in session mode orders are
//! created and completed through it (with `statement_timeout` and `plan_cache_mode` set on the database, since
//! PgBouncer ignores the startup `options` the pools send them in), and in transaction mode PgBouncer before 1.21
//! collides with the named statements sqlx prepares.
//!
//! Each test starts a PgBouncer of its own (the Debian package `pgbouncer`, which `.ci/run` installs) on a free
//! port, in front of the server `DATABASE_URL` names; it is stopped and its directory removed on drop.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use reqwest::{Client, StatusCode};
use serde_json::json;
use sqlx::{
    Connection, PgConnection, PgPool, Row,
    postgres::{PgPoolOptions, PgRow},
};

use crate::helpers::{ApiProcess, KillOnDrop, json, test_config};

/// The PgBouncer binary: Debian's package puts it in /usr/sbin, which a non-root `PATH` may lack.
fn pgbouncer_binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        "/usr/sbin/pgbouncer"
    } else {
        "pgbouncer"
    }
}

/// PgBouncer's version as (major, minor), from `pgbouncer --version` ("PgBouncer 1.18.0").
fn pgbouncer_version() -> (u32, u32) {
    let output = Command::new(pgbouncer_binary())
        .arg("--version")
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run pgbouncer ({err}): install it (apt-get install pgbouncer; .ci/run does)"
            )
        });
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected `pgbouncer --version`: {text}"));
    let mut parts = version.split('.').map(|part| part.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// The output of `id ARGS`, as a number.
fn id(args: &[&str]) -> u32 {
    let output = Command::new("id").args(args).output().unwrap();
    assert!(output.status.success(), "id {args:?}");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

/// A PgBouncer of its own on a free port, in front of the PostgreSQL server `DATABASE_URL` names, letting in
/// its user without a password (`auth_type = trust`). Stopped, and its directory removed, on drop.
struct PgBouncer {
    dir: PathBuf,
    port: u16,
    user: String,
    process: KillOnDrop,
}

impl PgBouncer {
    /// Starts it with `pool_mode` and the other `[pgbouncer]` `settings`, and waits until it accepts
    /// connections.
    fn start(pool_mode: &str, settings: &[(&str, &str)]) -> Self {
        let server = reqwest::Url::parse(
            &std::env::var("DATABASE_URL").expect("DATABASE_URL is set for #[sqlx::test]"),
        )
        .unwrap();
        let host = server.host_str().unwrap_or("localhost").to_owned();
        let server_port = server.port().unwrap_or(5432);
        let user = match server.username() {
            "" => "postgres".to_owned(),
            user => user.to_owned(),
        };
        // PgBouncer logs in to the server with the password its auth file holds for the user.
        let password = server.password().unwrap_or("").to_owned();

        let dir = std::env::temp_dir().join(format!("orders-pgbouncer-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        // A port the system just handed out and took back: PgBouncer cannot pick one itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut ini = format!(
            "[databases]\n\
             * = host={host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             admin_users = {user}\n\
             pool_mode = {pool_mode}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {log}\n\
             pidfile = {pid}\n",
            users = dir.join("users.txt").display(),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        );
        for (name, value) in settings {
            ini.push_str(&format!("{name} = {value}\n"));
        }
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        std::fs::write(
            dir.join("users.txt"),
            format!("\"{user}\" \"{password}\"\n"),
        )
        .unwrap();

        let mut command = Command::new(pgbouncer_binary());
        command
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // PgBouncer refuses to run as root: as root, run it as the `postgres` OS user, in a directory of its
        // own. Set on the command itself (not through runuser, which forks), so that the child killed on drop
        // is PgBouncer.
        if id(&["-u"]) == 0 {
            let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        let process = KillOnDrop(command.spawn().unwrap_or_else(|err| {
            panic!("cannot start pgbouncer ({err}): install it (apt-get install pgbouncer; .ci/run does)")
        }));
        let mut bouncer = Self {
            dir,
            port,
            user,
            process,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = bouncer.process.0.try_wait() {
                panic!("pgbouncer exited with {status}:\n{}", bouncer.log());
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not start on {port}:\n{}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// The URL of `database` through this PgBouncer.
    fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{database}?sslmode=disable",
            self.user, self.port
        )
    }

    /// What it logged so far, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// A `SHOW ...` of its admin console (the `pgbouncer` database; simple queries only), the rows whose
    /// `database` is `database`.
    async fn show(&self, what: &str, database: &str) -> Vec<PgRow> {
        let mut admin = PgConnection::connect(&self.url("pgbouncer"))
            .await
            .unwrap_or_else(|err| panic!("admin console: {err}\n{}", self.log()));
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("show {what}")))
            .fetch_all(&mut admin)
            .await
            .unwrap();
        admin.close().await.ok();
        rows.into_iter()
            .filter(|row| {
                row.try_get::<String, _>("database")
                    .is_ok_and(|name| name == database)
            })
            .collect()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A number in a row of the admin console, read from its text (its columns are of several types, counters
/// `NUMERIC`; simple queries answer in text).
fn number(row: &PgRow, column: &str) -> i64 {
    row.try_get_raw(column)
        .unwrap()
        .as_str()
        .unwrap_or_else(|err| panic!("{column}: {err}"))
        .parse()
        .unwrap_or_else(|err| panic!("{column}: {err}"))
}

/// The name of the test's own database.
fn database_name(db: &PgPool) -> String {
    db.connect_options()
        .get_database()
        .expect("database name")
        .to_owned()
}

/// The api binary with its in-process worker, on `database_url` (migrations go to PostgreSQL directly, never
/// through PgBouncer, as the README says; the test database is migrated already).
fn spawn_api(database_url: &str) -> ApiProcess {
    ApiProcess::spawn(database_url, |command| {
        command
            .env("WITH_WORKER", "true")
            .env("ORDER_STAGE_DELAY_MS", "20");
    })
}

/// Orders the test creates: a few one after the other, the rest at once.
const ORDERS: usize = 20;
const ONE_BY_ONE: usize = 5;

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn through_pgbouncer_in_session_mode_orders_are_created_and_completed(db: PgPool) {
    let name = database_name(&db);
    // As the README says, with the settings on the database rather than on the role: the role `postgres` is
    // shared with every other test. Connections opened from now on pick them up.
    for setting in [
        "statement_timeout = '3s'",
        "plan_cache_mode = 'force_generic_plan'",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "alter database \"{name}\" set {setting}"
        )))
        .execute(&db)
        .await
        .unwrap();
    }
    let bouncer = PgBouncer::start("session", &[("default_pool_size", "20")]);
    let api = spawn_api(&bouncer.url(&name));
    let base = api.base.clone();
    let api_logs = || api.logs();
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "{}", json(ready).await);
    let token = api.register_and_login(&client, "ada@example.com").await;
    let create = |n: usize| {
        let request = client
            .post(format!("{base}/orders/create"))
            .bearer_auth(&token)
            .json(&json!({"product_name": format!("Widget {n}"), "amount": 1}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::CREATED);
            json(response).await["id"]
                .as_str()
                .unwrap()
                .parse::<uuid::Uuid>()
                .unwrap()
        }
    };
    let mut ids = Vec::new();
    for n in 0..ONE_BY_ONE {
        ids.push(create(n).await);
    }
    ids.extend(join_all((ONE_BY_ONE..ORDERS).map(create)).await);

    let listed = client
        .get(format!("{base}/orders/my-orders?limit=100"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    let listed = json(listed).await;
    let mut listed: Vec<uuid::Uuid> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|order| order["id"].as_str().unwrap().parse().unwrap())
        .collect();
    listed.sort_unstable();
    ids.sort_unstable();
    assert_eq!(listed, ids);

    // The in-process worker completes them all, through PgBouncer too (read here directly from PostgreSQL).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (completed, all): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where status = 'COMPLETED'), count(*) from orders",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(all, ORDERS as i64);
        if completed == all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{completed} of {all} orders completed; the api wrote:\n{}\npgbouncer:\n{}",
            api_logs(),
            bouncer.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // PgBouncer saw the api: its client connections to the test database (the api's pool, nothing else connects
    // to it through PgBouncer yet), server connections for them, and the statements they ran.
    let clients = bouncer.show("clients", &name).await;
    assert!(!clients.is_empty(), "no client connection to {name}");
    let servers = bouncer.show("servers", &name).await;
    assert!(!servers.is_empty(), "no server connection to {name}");
    let stats = bouncer.show("stats", &name).await;
    assert_eq!(stats.len(), 1);
    let queries = number(&stats[0], "total_query_count");
    assert!(
        queries >= ORDERS as i64,
        "{queries} queries through PgBouncer"
    );

    // The settings the pools send in the startup `options` are dropped by PgBouncer: what applies is the
    // database's. The pool here asks for a 7 s timeout, the way the api asks for DATABASE_STATEMENT_TIMEOUT_MS.
    let mut config = test_config();
    config.database.database_url = bouncer.url(&name);
    config.database.migrate_on_start = false;
    config.database.database_statement_timeout_ms = 7000;
    let through = orders_core::db::connect(&config.database).await.unwrap();
    let timeout: String = sqlx::query_scalar("show statement_timeout")
        .fetch_one(&through)
        .await
        .unwrap();
    assert_eq!(timeout, "3s", "the database's setting applies");
    let plan_cache_mode: String = sqlx::query_scalar("show plan_cache_mode")
        .fetch_one(&through)
        .await
        .unwrap();
    assert_eq!(plan_cache_mode, "force_generic_plan");
    through.close().await;
}

/// Documents a limitation of PgBouncer before 1.21 with sqlx, the one the README's PgBouncer paragraph states:
/// in `pool_mode = transaction` sqlx's named prepared statements (`sqlx_s_1`, `sqlx_s_2`, ... counted per client
/// connection) collide on the server connections PgBouncer shares between clients, so Debian 12's PgBouncer
/// 1.18 can only be used in session mode.
///
/// The collision is made deterministic: PgBouncer has a single server connection, and two distinct client
/// connections each prepare their first statement, both named `sqlx_s_1`: the second `Parse` reaches the server
/// connection that already holds the first's.
///
/// With PgBouncer 1.21 or later the test checks the other half of the README's advice instead: with
/// `max_prepared_statements = 200` the same statements succeed. If the first half ever stops failing (sqlx no
/// longer naming its statements that way, say), update the README's PgBouncer paragraph.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn through_pgbouncer_1_18_in_transaction_mode_sqlx_statements_collide(db: PgPool) {
    let name = database_name(&db);
    let tracks_prepared_statements = pgbouncer_version() >= (1, 21);
    let mut settings = vec![("default_pool_size", "1")];
    if tracks_prepared_statements {
        settings.push(("max_prepared_statements", "200"));
    }
    let bouncer = PgBouncer::start("transaction", &settings);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&bouncer.url(&name))
        .await
        .unwrap();
    // Both held at once: two distinct client connections of PgBouncer, sharing its one server connection.
    let mut first = pool.acquire().await.unwrap();
    let mut second = pool.acquire().await.unwrap();
    let one: i32 = sqlx::query_scalar("select $1::int4")
        .bind(1)
        .fetch_one(&mut *first)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let collided = sqlx::query_scalar::<_, String>("select $1::text")
        .bind("two")
        .fetch_one(&mut *second)
        .await;

    if tracks_prepared_statements {
        assert_eq!(collided.unwrap(), "two");
        // And again, concurrently, on both connections: each runs the statement it prepared.
        for _ in 0..5 {
            let (one, two) = tokio::join!(
                sqlx::query_scalar::<_, i32>("select $1::int4")
                    .bind(1)
                    .fetch_one(&mut *first),
                sqlx::query_scalar::<_, String>("select $1::text")
                    .bind("two")
                    .fetch_one(&mut *second),
            );
            assert_eq!((one.unwrap(), two.unwrap().as_str()), (1, "two"));
        }
    } else {
        let err = collided.expect_err(
            "PgBouncer < 1.21 in transaction mode let two sqlx connections prepare `sqlx_s_1` on one server \
             connection: update the README's PgBouncer paragraph",
        );
        let database_error = err
            .as_database_error()
            .unwrap_or_else(|| panic!("not a database error: {err}"));
        assert_eq!(
            database_error.code().as_deref(),
            Some("42P05"),
            "{database_error}"
        );
        assert!(
            database_error
                .message()
                .contains(r#"prepared statement "sqlx_s_1" already exists"#),
            "{database_error}"
        );
    }
    drop((first, second));
    pool.close().await;
}
