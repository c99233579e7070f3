//! The worker: consumes `ProcessOrder` jobs from the apalis Redis queue and runs the reconciler beside it.
//!
//! apalis-redis is hardened here rather than trusted: heartbeat and orphan timeouts are set explicitly (a
//! killed worker's jobs come back in seconds, not apalis's default 5 minutes), every (re)start registers under
//! a fresh worker name (a reused name is refused while it still looks alive), and any Redis error, which ends
//! an apalis worker for good, is followed by a restart with backoff. Nothing depends on Redis keeping jobs:
//! the reconciler re-queues from PostgreSQL whatever a lost job would leave behind. Each consumer generation that
//! stops (a Redis error, or shutdown) is unregistered at once, and the janitor sweeps up after killed processes.

pub mod config;
pub mod janitor;
pub mod outage;
pub mod process_order;
pub mod reconcile;
pub mod requeue;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::{layers::catch_panic::CatchPanicLayer, prelude::*};
use apalis_redis::RedisStorage;
use orders_core::{
    config::QueueConfig,
    queue::{self, OrderQueue, ProcessOrder, gauges::BacklogGauges},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::{Config, WorkerSettings};
pub use janitor::Janitor;
pub use process_order::{JobFailure, Outcome, ProcessError, Processor};
pub use reconcile::Reconciler;

/// Heartbeats a worker may miss before other workers take its jobs back.
const MISSED_HEARTBEATS: usize = 3;
/// Most jobs fetched from Redis at once.
const FETCH_BATCH: usize = 128;
/// Longest pause between two restarts after Redis errors.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);

/// A name no other worker process has, now or before: `worker-<pid>-<uuid v7>`.
pub fn unique_worker_name() -> String {
    format!(
        "worker-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    )
}

/// Wakes an idle consumer every `period` so it asks Redis for jobs (a push from another process does not wake
/// it). Used instead of apalis's `poll_with_interval`, whose strategy re-arms its timer without polling it: when
/// a fetch completes within the same poll, nothing is left to wake the worker until its next heartbeat (seconds
/// of pickup delay, measured). `tokio::time::Interval` registers its waker on every pending tick.
struct EveryInterval {
    interval: tokio::time::Interval,
}

impl EveryInterval {
    fn new(period: Duration) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { interval }
    }
}

impl PollStrategy for EveryInterval {
    fn poll_drive(
        &mut self,
        cx: &mut std::task::Context<'_>,
        _: &PollSnapshot,
    ) -> std::task::Poll<Option<()>> {
        let mut ticked = false;
        // Drain ready ticks until one is pending, so the waker is always registered for the next.
        while self.interval.poll_tick(cx).is_ready() {
            ticked = true;
        }
        if ticked {
            std::task::Poll::Ready(Some(()))
        } else {
            std::task::Poll::Pending
        }
    }
}

/// Describes the worker's series and starts its counters at 0, so a scrape lists them before the first job.
fn register_metrics() {
    metrics::describe_counter!(
        "worker_jobs_total",
        "Jobs handled, by outcome: completed, skipped, lost_lease, failed, aborted, parked"
    );
    metrics::describe_counter!(
        "orders_parked_total",
        "Orders parked after ORDER_MAX_ATTEMPTS attempts (re-drive them with `worker requeue`)"
    );
    metrics::counter!("orders_parked_total").increment(0);
    metrics::describe_counter!(
        "worker_jobs_retried_total",
        "Jobs delivered again after a failed attempt"
    );
    metrics::describe_histogram!(
        "worker_job_duration_seconds",
        metrics::Unit::Seconds,
        "Time to handle one job"
    );
    orders_core::queue::gauges::describe();
    metrics::describe_counter!(
        "worker_reconciler_requeued_total",
        "Jobs pushed by the reconciler (backlog fed from PostgreSQL, and re-pushes)"
    );
    metrics::describe_counter!(
        "order_transitions_total",
        "Order status changes made by workers, by new status"
    );
    for outcome in [
        "completed",
        "skipped",
        "lost_lease",
        "failed",
        "aborted",
        "parked",
    ] {
        metrics::counter!("worker_jobs_total", "outcome" => outcome).increment(0);
    }
    metrics::counter!("worker_jobs_retried_total").increment(0);
    metrics::counter!("worker_reconciler_requeued_total").increment(0);
    for to in ["PROCESSING", "COMPLETED"] {
        metrics::counter!("order_transitions_total", "to" => to).increment(0);
    }
}

/// Runs the consumer and the reconciler until `stop` is cancelled, then lets the jobs in flight finish (at
/// most the shutdown timeout) and returns.
pub async fn run(
    settings: WorkerSettings,
    queue_config: QueueConfig,
    db: PgPool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    settings.validate()?;
    orders_core::telemetry::prometheus();
    register_metrics();
    let name = unique_worker_name();
    let connection = queue::redis_connection(&queue_config)?;
    let push_queue = OrderQueue::new(connection.clone(), &queue_config);
    // Longer than apalis's own orphan timeout (heartbeat × missed), so that its recovery goes first.
    let dead_after = settings.heartbeat() * (2 * MISSED_HEARTBEATS as u32);
    let mut janitor = Janitor::new(connection.clone(), push_queue.keys().clone(), dead_after);
    let outage = outage::RedisOutage::default();
    if !push_queue.ping(queue_config.redis_timeout()).await {
        outage.failed("the first ping", &"no answer");
    }
    let reconciler = Reconciler::new(
        name.clone(),
        db.clone(),
        push_queue,
        janitor.clone(),
        &settings,
        queue_config.redis_timeout(),
        outage.clone(),
    );
    let reconciling =
        tokio::spawn(reconciler.run(settings.reconcile_interval(), stop.child_token()));
    let processor = Processor::new(db, name.clone(), settings.lease(), settings.stage_delay())
        .with_max_attempts(settings.order_max_attempts);
    tracing::info!(
        worker = %name,
        queue = %queue_config.queue_name,
        concurrency = settings.concurrency(),
        max_jobs = queue_config.queue_max_jobs,
        "worker started"
    );

    let mut generation = 0usize;
    let mut backoff = Duration::from_millis(250);
    while !stop.is_cancelled() {
        let storage = RedisStorage::<ProcessOrder>::new(connection.clone()).with_config(
            queue::queue_settings(&queue_config)
                .heartbeat_interval(settings.heartbeat())
                .missed_heartbeats(MISSED_HEARTBEATS)
                .batch_size(usize::from(settings.concurrency()).min(FETCH_BATCH)),
        );
        let generation_name = format!("{name}-{generation}");
        let worker = WorkerBuilder::new(generation_name.clone())
            .backend(storage.poll_with_strategy(EveryInterval::new(settings.poll_interval())))
            .data(processor.clone())
            .layer(CatchPanicLayer::with_panic_handler(on_panic))
            .concurrency(usize::from(settings.concurrency()))
            .build(handle_job);
        let signal = stop.clone();
        let started = Instant::now();
        let consuming = worker.run_until(async move {
            signal.cancelled().await;
            Ok::<(), std::io::Error>(())
        });
        let deadline = async {
            stop.cancelled().await;
            tokio::time::sleep(settings.shutdown_timeout()).await;
        };
        let result = tokio::select! {
            result = consuming => Some(result),
            () = deadline => {
                tracing::warn!("jobs still running after the shutdown timeout; leaving them to their leases");
                None
            }
        };
        // This generation is over: unregister it now rather than leave it to the sweeps (apalis's own
        // unregistering on close removes the wrong member), and give back what it fetched but did not finish.
        match janitor.retire(&generation_name).await {
            Ok(0) => {}
            Ok(returned) => {
                tracing::info!(worker = %generation_name, returned, "unfinished jobs returned to the queue")
            }
            Err(err) => {
                tracing::debug!(worker = %generation_name, error = %err, "cannot unregister; the janitor will")
            }
        }
        let Some(result) = result else { break };
        if stop.is_cancelled() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(250);
        }
        // One line per restart: apalis's own lines about the same failure are off in the default RUST_LOG.
        match result {
            Ok(()) => tracing::warn!(?backoff, "queue consumer stopped on its own; restarting it"),
            Err(err) => {
                tracing::warn!(error = %err, ?backoff, attempt = generation + 1, "queue consumer failed (is Redis up?); restarting it")
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_RESTART_BACKOFF);
        generation += 1;
    }
    stop.cancel();
    let _ = reconciling.await;
    tracing::info!(worker = %name, "worker stopped");
    Ok(())
}

/// The backstop for a panic outside [`Processor::run_job`] (which catches and counts its own): the job is not
/// retried and the worker stays up. A named function rather than apalis's `catch_panic()`, whose handler type keeps the worker's future from
/// being spawned onto the runtime.
fn on_panic(panic: &Box<dyn std::any::Any + Send>) -> AbortError {
    let message = process_order::panic_message(panic.as_ref());
    tracing::error!(%message, "job panicked outside its handler");
    AbortError::new(std::io::Error::other(message))
}

/// One job. A failure counts as one of the order's attempts; it is retried by apalis (with a growing delay) and
/// by the reconciler, until the order runs out of attempts and is parked. A missing order is not retried.
#[tracing::instrument(skip_all, fields(order_id = %job.order_id, attempt = attempt.current()))]
async fn handle_job(
    job: ProcessOrder,
    processor: Data<Processor>,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    if attempt.current() > 1 {
        metrics::counter!("worker_jobs_retried_total").increment(1);
    }
    let started = Instant::now();
    let result = processor.run_job(job.order_id).await;
    metrics::histogram!("worker_job_duration_seconds").record(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok(Outcome::Completed) => "completed",
        Ok(Outcome::Skipped(_)) => "skipped",
        Ok(Outcome::LostLease) => "lost_lease",
        Ok(Outcome::Parked) => "parked",
        Err(failure) if failure.parked => "parked",
        Err(failure) if failure.error.is_permanent() => "aborted",
        Err(_) => "failed",
    };
    metrics::counter!("worker_jobs_total", "outcome" => outcome).increment(1);
    match result {
        Ok(_) => Ok(()),
        Err(failure) if failure.parked => Err(AbortError::new(failure).into()),
        Err(failure) if failure.error.is_permanent() => {
            tracing::error!(error = %failure, "job failed for good");
            Err(AbortError::new(failure).into())
        }
        Err(failure) => {
            tracing::warn!(error = %failure, "job failed; it will be retried");
            Err(failure.into())
        }
    }
}

/// Serves `GET /metrics` (Prometheus text format) on `addr` until `stop` is cancelled, sampling the backlog
/// gauges on each scrape.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    gauges: Arc<BacklogGauges>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let handle = orders_core::telemetry::prometheus();
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            let gauges = gauges.clone();
            async move {
                gauges.refresh().await;
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
