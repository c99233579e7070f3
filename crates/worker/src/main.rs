//! The `worker` binary: consumes the order queue from Redis, moves each order `PENDING → PROCESSING → COMPLETED`
//! and runs the reconciler and the janitor beside it. `worker requeue` re-drives parked or stuck orders. The work
//! itself is in the `worker` library.

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use orders_core::domain::OrderId;
use orders_core::queue::gauges::BacklogGauges;
use tokio_util::sync::CancellationToken;
use worker::{Config, config::Command};

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("error: cannot read .env: {err}");
        return ExitCode::from(2);
    }
    let config = Config::parse();
    if let Err(err) = config.worker.validate() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    orders_core::telemetry::init(&config.log);
    let db = match orders_core::db::connect(&config.database).await {
        Ok(db) => db,
        Err(err) => {
            tracing::error!(
                "cannot start: {}",
                orders_core::telemetry::error_chain(&err)
            );
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Requeue {
        order_ids,
        stuck,
        limit,
    }) = config.command
    {
        let ids: Vec<OrderId> = order_ids.into_iter().map(OrderId).collect();
        let overdue = stuck.then(|| config.worker.redeliver_after());
        return match worker::requeue::run(&db, &ids, overdue, limit).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(
                    "cannot requeue: {}",
                    orders_core::telemetry::error_chain(&err)
                );
                ExitCode::FAILURE
            }
        };
    }
    let stop = CancellationToken::new();
    let health = worker::ConsumerHealth::default();
    if config.worker_metrics_addr != "off" {
        let queue = match orders_core::queue::order_queue(&config.queue) {
            Ok(queue) => queue,
            Err(err) => {
                tracing::error!(
                    "cannot start: {}",
                    orders_core::telemetry::error_chain(&err)
                );
                return ExitCode::FAILURE;
            }
        };
        let gauges = Arc::new(BacklogGauges::new(db.clone(), queue));
        match tokio::net::TcpListener::bind(&config.worker_metrics_addr).await {
            Ok(listener) => {
                if let Ok(addr) = listener.local_addr() {
                    tracing::info!(%addr, "metrics at /metrics");
                }
                tokio::spawn(worker::serve_metrics(
                    listener,
                    gauges,
                    health.clone(),
                    stop.clone(),
                ));
            }
            Err(err) => {
                tracing::error!(
                    "cannot listen on WORKER_METRICS_ADDR={} ({err}); set another address or `off`",
                    config.worker_metrics_addr
                );
                return ExitCode::FAILURE;
            }
        }
    }
    match orders_core::queue::redis_connection(&config.queue) {
        Ok(conn) => {
            orders_core::queue::server::spawn_check(
                conn,
                config.queue.redis_timeout(),
                "worker",
                stop.clone(),
            );
        }
        Err(err) => {
            tracing::error!(
                "cannot start: {}",
                orders_core::telemetry::error_chain(&err)
            );
            return ExitCode::FAILURE;
        }
    }
    let signal = stop.clone();
    tokio::spawn(async move {
        orders_core::shutdown_signal().await;
        signal.cancel();
    });
    match worker::run_with_health(config.worker, config.queue, db, stop, health).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(
                "worker failed: {}",
                orders_core::telemetry::error_chain(&err)
            );
            ExitCode::FAILURE
        }
    }
}
