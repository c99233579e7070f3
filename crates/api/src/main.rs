//! The `api` binary: the orders HTTP API (axum), and with `--with-worker` the queue worker in the same process.
//! `api migrate` applies the database migrations and exits. A thin shim: reading `.env` and the settings, then
//! everything else is in the `api` library ([`api::App`]).

use std::process::ExitCode;

use api::{App, Config, config::Command};
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
