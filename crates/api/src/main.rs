//! The `api` binary: the orders HTTP API (axum), and with `--with-worker` the queue worker in the same process.
//! `api migrate` applies the database migrations and exits; `api healthcheck` asks a running api whether it is
//! healthy; `api users set-role` gives a user a role for the admin API. A thin shim: reading `.env` and the settings, then everything else is in the `api` library
//! ([`api::App`]).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use api::{
    App, Config,
    config::{Command, UsersCommand},
};
use clap::Parser;

/// mimalloc instead of the system allocator: glibc's arena locks showed in the request path's profile (mimalloc
/// gave the list about 25 % more requests/s), and its per-thread arenas kept the Argon2 hashes' memory (19 MiB
/// each) resident. See README, "Performance".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("error: cannot read .env: {err}");
        return ExitCode::from(2);
    }
    let config = Config::parse();
    if let Some(Command::Healthcheck { url, timeout_ms }) = &config.command {
        let url = url
            .clone()
            .unwrap_or_else(|| default_health_url(config.bind_addr));
        return match healthcheck(&url, Duration::from_millis(*timeout_ms)).await {
            Ok(status) => {
                println!("{url}: {status}");
                ExitCode::SUCCESS
            }
            Err(problem) => {
                eprintln!("{url}: {problem}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Users {
        action: UsersCommand::SetRole { email, role },
    }) = &config.command
    {
        return api::admin::users::set_role(&config.database, email, role).await;
    }
    if let Some(Command::Migrate) = config.command {
        orders_core::telemetry::init(&config.log);
        return match orders_core::db::migrate(&config.database).await {
            Ok(()) => {
                tracing::info!("migrations applied");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(
                    "cannot migrate: {}",
                    orders_core::telemetry::error_chain(&err)
                );
                ExitCode::FAILURE
            }
        };
    }
    if let Err(err) = config.validate() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    orders_core::telemetry::init(&config.log);
    let app = match App::build(config).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(
                "cannot start: {}",
                orders_core::telemetry::error_chain(&err)
            );
            return ExitCode::FAILURE;
        }
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        orders_core::shutdown_signal().await;
        signal.cancel();
    });
    match app.run_until_stopped(stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(
                "stopped with an error: {}",
                orders_core::telemetry::error_chain(&err)
            );
            ExitCode::FAILURE
        }
    }
}

/// `/health/live` on the api's own listener, through loopback when it listens on every address.
fn default_health_url(bind_addr: SocketAddr) -> String {
    let ip = match bind_addr.ip() {
        ip if !ip.is_unspecified() => ip,
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    format!(
        "http://{}/health/live",
        SocketAddr::new(ip, bind_addr.port())
    )
}

/// One `GET url` over HTTP/1.1 on a plain TCP connection (no TLS, no redirect): the status line if its status is
/// 2xx, else what went wrong. The connection and the status line must come within `timeout`.
async fn healthcheck(url: &str, timeout: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    // `[::1]:8000`, `[::1]`, `127.0.0.1:8000`, `api`: a port unless it ends the authority.
    let address = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        // The status line is all that is needed; it fits in the first 512 bytes of any sane answer.
        let mut head = Vec::with_capacity(512);
        while !head.contains(&b'\n') && head.len() < 512 {
            if stream.read_buf(&mut head).await? == 0 {
                break;
            }
        }
        Ok::<_, std::io::Error>(head)
    };
    let head = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
        .map_err(|err| err.to_string())?;
    let line = String::from_utf8_lossy(&head);
    let line = line
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_owned();
    // `HTTP/1.1 200 OK`
    match line.split(' ').nth(1) {
        Some(code) if code.len() == 3 && code.starts_with('2') => Ok(line),
        Some(_) => Err(line),
        None => Err(format!("not an HTTP answer: {line:?}")),
    }
}
