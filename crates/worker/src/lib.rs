//! The worker: consumes `ProcessOrder` jobs from the apalis Redis queue and runs the reconciler beside it.
//!
//! apalis-redis is hardened here rather than trusted: heartbeat and orphan timeouts are set explicitly (a
//! killed worker's jobs come back in seconds, not apalis's default 5 minutes), every (re)start registers under
//! a fresh worker name (a reused name is refused while it still looks alive), and any Redis error, which ends
//! an apalis worker for good, is followed by a restart with backoff. Nothing depends on Redis keeping jobs:
//! the reconciler re-queues from PostgreSQL whatever a lost job would leave behind. Each consumer generation that
//! stops (a Redis error, or shutdown) is unregistered at once, and the janitor sweeps up after killed processes.
//!
//! A consumer that fails while Redis answers was stopped by an entry apalis-redis cannot read (Redis lost part of
//! a job): the janitor repairs or removes what the failed consumer had fetched before it is restarted, so no
//! partial loss stops processing. Such failures are logged and counted apart from a Redis outage, and a consumer
//! that keeps failing against an answering Redis makes the worker unhealthy ([`health`]).

pub mod config;
pub mod console;
pub mod health;
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
pub use health::ConsumerHealth;
pub use janitor::Janitor;
pub use process_order::{JobFailure, Outcome, ProcessError, Processor};
pub use reconcile::Reconciler;

/// Heartbeats a worker may miss before other workers take its jobs back.
const MISSED_HEARTBEATS: usize = 3;
/// Most jobs fetched from Redis at once.
const FETCH_BATCH: usize = 128;
/// Shortest and longest pause between two restarts after Redis errors (none when the cause was repaired).
const MIN_RESTART_BACKOFF: Duration = Duration::from_millis(250);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// Longest pause between two restarts while Redis answers.
const MAX_ANSWERING_BACKOFF: Duration = Duration::from_secs(1);

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
    metrics::describe_counter!(
        "worker_consumer_failures_total",
        "Queue consumers that failed and were restarted, by whether Redis answered right after (answers, unreachable)"
    );
    for redis in ["answers", "unreachable"] {
        metrics::counter!("worker_consumer_failures_total", "redis" => redis).increment(0);
    }
    metrics::describe_gauge!(
        "worker_consumer_failing",
        "1 while the consumer keeps failing although Redis answers (GET /health answers 503 meanwhile)"
    );
    metrics::gauge!("worker_consumer_failing").set(0.0);
    metrics::describe_counter!(
        "queue_unreadable_entries_total",
        "Queue entries apalis-redis could not read (Redis lost part of them), repaired or removed, by problem"
    );
    for problem in janitor::PROBLEMS {
        metrics::counter!("queue_unreadable_entries_total", "problem" => problem).increment(0);
    }
    metrics::describe_counter!(
        "worker_lease_takeovers_total",
        "PROCESSING orders taken over after their lease expired (not a status change)"
    );
    metrics::counter!("worker_lease_takeovers_total").increment(0);
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
    run_with_health(settings, queue_config, db, stop, ConsumerHealth::default()).await
}

/// [`run`], reporting the consumer's health to `health` (which `GET /health` reads).
pub async fn run_with_health(
    settings: WorkerSettings,
    queue_config: QueueConfig,
    db: PgPool,
    stop: CancellationToken,
    health: ConsumerHealth,
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
    let ping_queue = push_queue.clone();
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
    let processor = Processor::new(
        db.clone(),
        name.clone(),
        settings.lease(),
        settings.stage_delay(),
    )
    .with_max_attempts(settings.order_max_attempts);
    let publishing = tokio::spawn(console::publish_until_stopped(
        connection.clone(),
        ping_queue.keys().clone(),
        name.clone(),
        processor.counts().clone(),
        stop.child_token(),
    ));
    tracing::info!(
        worker = %name,
        queue = %queue_config.queue_name,
        concurrency = settings.concurrency(),
        max_jobs = queue_config.queue_max_jobs,
        "worker started"
    );

    let mut generation = 0usize;
    let mut backoff = MIN_RESTART_BACKOFF;
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
        let ran_well = tokio::spawn({
            let health = health.clone();
            async move {
                tokio::time::sleep(health::HEALTHY_AFTER).await;
                health.ran_well();
            }
        });
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
        ran_well.abort();
        // A failure while Redis answers comes from the queue's content, not from Redis: repair or remove what
        // this generation fetched (apalis moved its batch to the in-flight set before failing on it).
        let failure = match &result {
            Some(Err(err)) if !stop.is_cancelled() => {
                let redis_answers = ping_queue.ping(queue_config.redis_timeout()).await;
                let healed = if redis_answers {
                    match janitor.heal_after_failure(&generation_name).await {
                        Ok(healed) => healed,
                        Err(heal_err) => {
                            tracing::warn!(error = %heal_err, "cannot examine what the failed consumer fetched");
                            0
                        }
                    }
                } else {
                    0
                };
                // A failure whose cause was found and removed is not held against the consumer.
                if healed == 0 {
                    health.failed(redis_answers, &err.to_string());
                }
                Some((redis_answers, healed))
            }
            _ => None,
        };
        // apalis drops the jobs a failed consumer was running: their orders keep this process's claims, which no
        // handler will complete. Give them back rather than wait for their leases, and refund the attempts.
        if matches!(result, Some(Err(_))) {
            match orders_core::db::orders::release_claims_of(&db, &name).await {
                Ok(released) if released.is_empty() => {}
                Ok(released) => {
                    tracing::info!(
                        orders = released.len(),
                        "claims of the failed consumer's jobs given back"
                    )
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot give back the failed consumer's claims; their leases end them")
                }
            }
        }
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
        if started.elapsed() > health::HEALTHY_AFTER {
            backoff = MIN_RESTART_BACKOFF;
        }
        // One line per restart: apalis's own lines about the same failure are off in the default RUST_LOG.
        match (result, &failure) {
            (Err(err), Some((true, healed))) => {
                let healed = *healed;
                metrics::counter!("worker_consumer_failures_total", "redis" => "answers")
                    .increment(1);
                if healed > 0 {
                    // The cause is gone: restart at once.
                    backoff = Duration::ZERO;
                } else {
                    // Redis answers, so a restart costs little: keep it prompt (a lost registration, say).
                    backoff = backoff.min(MAX_ANSWERING_BACKOFF);
                }
                let report = health.report();
                if report.healthy() {
                    tracing::warn!(error = %err, healed, ?backoff, attempt = generation + 1, "queue consumer failed although Redis answers; restarting it");
                } else {
                    tracing::error!(error = %err, healed, ?backoff, failures = report.consecutive_failures, "queue consumer keeps failing although Redis answers; restarting it (GET /health answers 503)");
                }
            }
            (Err(err), _) => {
                metrics::counter!("worker_consumer_failures_total", "redis" => "unreachable")
                    .increment(1);
                tracing::warn!(error = %err, ?backoff, attempt = generation + 1, "queue consumer failed (is Redis up?); restarting it")
            }
            (Ok(()), _) => {
                tracing::warn!(?backoff, "queue consumer stopped on its own; restarting it")
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).clamp(
            MIN_RESTART_BACKOFF,
            match &failure {
                Some((true, _)) => MAX_ANSWERING_BACKOFF,
                _ => MAX_RESTART_BACKOFF,
            },
        );
        generation += 1;
    }
    stop.cancel();
    let _ = reconciling.await;
    let _ = publishing.await;
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
    let running = processor.counts().start();
    let result = processor.run_job(job.order_id).await;
    drop(running);
    if matches!(result, Ok(Outcome::Completed)) {
        processor.counts().completed();
    }
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

/// Serves `GET /metrics` (Prometheus text format, sampling the backlog gauges on each scrape) and `GET /health`
/// (the consumer's [`health::HealthReport`] as JSON: 200 while healthy, 503 while the consumer keeps failing
/// although Redis answers) on `listener` until `stop` is cancelled.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    gauges: Arc<BacklogGauges>,
    health: ConsumerHealth,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let handle = orders_core::telemetry::prometheus();
    let health_route = axum::routing::get(move || {
        let report = health.report();
        let status = if report.healthy() {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        };
        std::future::ready((status, axum::Json(report)))
    });
    let router = axum::Router::new().route("/health", health_route).route(
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
