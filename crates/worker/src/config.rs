//! The worker's settings. [`WorkerSettings`] is shared with `api --with-worker`, which runs the same worker in
//! its own process.

use std::time::Duration;

use clap::{Args, Parser};
use orders_core::config::{DatabaseConfig, LogConfig, QueueConfig};

/// Consumes the order queue and moves each order PENDING → PROCESSING → COMPLETED.
#[derive(Debug, Clone, Parser)]
#[command(name = "worker", version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub queue: QueueConfig,

    #[command(flatten)]
    pub log: LogConfig,

    #[command(flatten)]
    pub worker: WorkerSettings,

    /// Where `GET /metrics` (Prometheus) listens; `off` to disable. (`api --with-worker` serves the worker's
    /// metrics on the api's own `/metrics` instead.)
    #[arg(long, env = "WORKER_METRICS_ADDR", default_value = "127.0.0.1:9000")]
    pub worker_metrics_addr: String,
}

/// What to do instead of consuming the queue.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Re-drive parked or stuck orders: reset their attempts, unpark them and mark them not queued, so that the
    /// reconciler of a running worker pushes them within RECONCILE_INTERVAL_MS. Finished orders, and orders a
    /// live worker holds, are left alone. Prints one line per order re-driven.
    #[command(arg_required_else_help = true)]
    Requeue {
        /// Orders to re-drive, by id.
        #[arg(conflicts_with = "stuck")]
        order_ids: Vec<uuid::Uuid>,
        /// Re-drive every parked order, every PENDING order whose job was pushed longer than
        /// RECONCILE_REDELIVER_AFTER_MS ago, and every PROCESSING order whose lease expired.
        #[arg(long)]
        stuck: bool,
        /// With --stuck, re-drive at most this many orders (oldest first in each kind).
        #[arg(long, default_value_t = 100_000, requires = "stuck")]
        limit: i64,
    },
}

/// Orders per second one worker process is sized for when `WORKER_CONCURRENCY` is not set.
pub const DEFAULT_TARGET_RATE: u64 = 320;

/// How the worker processes jobs and recovers lost ones.
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Jobs processed at once by this process. A job holds no database connection while it waits out a
    /// stage, so this can be in the thousands. Default: enough for 320 orders/s at the configured stage delay
    /// (320 × (2 × ORDER_STAGE_DELAY_MS + 500 ms), at least 128): 1,440 with the default 2 s stages, 160 with
    /// none.
    #[arg(long, env = "WORKER_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub worker_concurrency: Option<u16>,

    /// Attempts an order gets (each delivery that claims it or fails counts one). Past them it is parked: logged
    /// at error level, counted in `orders_parked_total`, and left PENDING (or PROCESSING) with `parked_at` set
    /// until `worker requeue` re-drives it.
    #[arg(long, env = "ORDER_MAX_ATTEMPTS", default_value_t = crate::process_order::DEFAULT_MAX_ATTEMPTS, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub order_max_attempts: u16,

    /// Simulated work per stage, in milliseconds (PENDING → PROCESSING, then this long, then COMPLETED).
    #[arg(long, env = "ORDER_STAGE_DELAY_MS", default_value_t = 2000)]
    pub order_stage_delay_ms: u64,

    /// How long a PROCESSING order stays claimed by its worker (milliseconds). If the worker dies, another
    /// takes the order over once this has passed. Must exceed twice the stage delay.
    #[arg(long, env = "ORDER_LEASE_MS", default_value_t = 10_000)]
    pub order_lease_ms: u64,

    /// How often an idle worker asks Redis for new jobs (milliseconds).
    #[arg(long, env = "WORKER_POLL_INTERVAL_MS", default_value_t = 50)]
    pub worker_poll_interval_ms: u64,

    /// How often the worker proves it is alive to Redis (milliseconds; at least 1000). After 3 missed beats,
    /// other workers take back its unfinished jobs.
    #[arg(long, env = "WORKER_HEARTBEAT_MS", default_value_t = 3000)]
    pub worker_heartbeat_ms: u64,

    /// How often the reconciler sweeps Redis and looks in PostgreSQL for orders whose job may be lost
    /// (milliseconds). While a backlog waits in PostgreSQL it also feeds it every 100 ms.
    #[arg(long, env = "RECONCILE_INTERVAL_MS", default_value_t = 5000)]
    pub reconcile_interval_ms: u64,

    /// A PENDING order whose job was pushed longer ago than this is pushed again, if Redis has room
    /// (milliseconds). By age alone: a duplicate delivery is harmless, a lost one is not.
    #[arg(long, env = "RECONCILE_REDELIVER_AFTER_MS", default_value_t = 10_000)]
    pub reconcile_redeliver_after_ms: u64,

    /// On SIGTERM/SIGINT, how long jobs in flight may take to finish before the process exits anyway
    /// (milliseconds). Their orders are then recovered through their lease.
    #[arg(long, env = "WORKER_SHUTDOWN_TIMEOUT_MS", default_value_t = 30_000)]
    pub worker_shutdown_timeout_ms: u64,
}

/// A setting that makes the worker refuse to start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(
        "ORDER_LEASE_MS ({lease}) must be more than twice ORDER_STAGE_DELAY_MS ({stage}): otherwise a slow but live worker loses its orders to another"
    )]
    LeaseTooShort { lease: u64, stage: u64 },
    #[error("{0} must be more than 0")]
    Zero(&'static str),
    #[error(
        "WORKER_HEARTBEAT_MS ({0}) must be at least {MIN_HEARTBEAT_MS}: apalis-redis counts heartbeats in whole seconds, so a shorter beat gets live workers declared dead"
    )]
    HeartbeatTooShort(u64),
}

/// The shortest heartbeat. apalis-redis 1.0 records a worker's last beat in whole seconds and rounds the time
/// after which it counts as dead (3 beats) down to whole seconds, so with beats of 500 ms a live worker was
/// declared dead just after each second boundary: another worker took its jobs back while it ran them, and its
/// consumer restarted (found by the multi-process test).
pub const MIN_HEARTBEAT_MS: u64 = 1000;

impl WorkerSettings {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (name, value) in [
            ("WORKER_POLL_INTERVAL_MS", self.worker_poll_interval_ms),
            ("WORKER_HEARTBEAT_MS", self.worker_heartbeat_ms),
            ("RECONCILE_INTERVAL_MS", self.reconcile_interval_ms),
            ("ORDER_LEASE_MS", self.order_lease_ms),
        ] {
            if value == 0 {
                return Err(SettingsError::Zero(name));
            }
        }
        if self.worker_heartbeat_ms < MIN_HEARTBEAT_MS {
            return Err(SettingsError::HeartbeatTooShort(self.worker_heartbeat_ms));
        }
        if self.order_lease_ms <= self.order_stage_delay_ms.saturating_mul(2) {
            return Err(SettingsError::LeaseTooShort {
                lease: self.order_lease_ms,
                stage: self.order_stage_delay_ms,
            });
        }
        Ok(())
    }

    /// Jobs processed at once: `WORKER_CONCURRENCY`, or by default what sustains [`DEFAULT_TARGET_RATE`] at the
    /// stage delay (Little's law: rate × time per job, with 0.5 s of headroom per job). A job slot completes one
    /// order per two stages plus a few milliseconds; a fixed large default would only cost memory when stages are
    /// short.
    pub fn concurrency(&self) -> u16 {
        self.worker_concurrency.unwrap_or_else(|| {
            let per_job_ms = self
                .order_stage_delay_ms
                .saturating_mul(2)
                .saturating_add(500);
            let slots = DEFAULT_TARGET_RATE.saturating_mul(per_job_ms) / 1000;
            u16::try_from(slots.clamp(128, 10_000)).unwrap_or(10_000)
        })
    }

    /// Simulated work per stage.
    pub fn stage_delay(&self) -> Duration {
        Duration::from_millis(self.order_stage_delay_ms)
    }

    /// Lease on a PROCESSING order.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.order_lease_ms)
    }

    /// Idle poll interval.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.worker_poll_interval_ms)
    }

    /// Redis heartbeat.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.worker_heartbeat_ms)
    }

    /// Reconciler period.
    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms)
    }

    /// Redelivery threshold.
    pub fn redeliver_after(&self) -> Duration {
        Duration::from_millis(self.reconcile_redeliver_after_ms)
    }

    /// Graceful shutdown bound.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.worker_shutdown_timeout_ms)
    }
}
