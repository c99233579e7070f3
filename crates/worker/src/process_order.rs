//! The job handler. Jobs may arrive zero, one or many times, in any order, and after the order was cancelled;
//! every state change is a conditional update in PostgreSQL, so the outcome is the same in every case:
//! each order makes each transition at most once, and only the transitions the state machine allows.

use std::{
    panic::AssertUnwindSafe,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use futures_util::FutureExt;

use orders_core::{
    db::orders::{self as db, Attempt, Claim},
    domain::{OrderId, OrderStatus},
};

use orders_core::db::batch::{BatchError, Batcher, Limits};
use sqlx::PgPool;
use uuid::Uuid;

/// Moves orders along. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Processor {
    db: PgPool,
    worker_name: String,
    lease: Duration,
    stage_delay: Duration,
    max_attempts: i32,
    claims: Batcher<Attempt, Option<OrderStatus>>,
    completions: Batcher<Attempt, bool>,
    /// What the console's worker card reports: jobs running, orders completed.
    counts: std::sync::Arc<crate::console::JobCounts>,
}

/// Most transitions in one statement.
const MAX_BATCH: usize = 128;

/// Most statements of one kind (claims, completions) running at once. Few, so that batches grow while one runs:
/// each commit announces its changes (see `db::events`), and PostgreSQL serializes the commits of notifying
/// transactions, so many small batches wait on each other. A drain of 30,000 orders measured about 2,900 orders/s
/// with one statement per pool connection (10) and 3,500–4,500 with one or two, about 40 orders per commit instead
/// of 10. Two, not one: a statement waiting on a row lock (a cancel) does not hold up every transition.
const BATCHES_IN_FLIGHT: usize = 2;

/// Attempts an order gets unless `ORDER_MAX_ATTEMPTS` says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u16 = 5;

/// What handling one job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// PENDING (or an abandoned PROCESSING) → PROCESSING → COMPLETED.
    Completed,
    /// Nothing to do: the order is cancelled, completed, or held by a live lease of another worker.
    Skipped(OrderStatus),
    /// Another worker took the order over while this one worked (this one's lease had expired).
    LostLease,
    /// The order has had its `ORDER_MAX_ATTEMPTS` and is parked now: nothing pushes it again until `worker
    /// requeue` re-drives it.
    Parked,
}

/// A job that failed: the error, and whether its order is parked now (then the job is not retried).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct JobFailure {
    /// What went wrong (a panic is reported as [`ProcessError::Panicked`]).
    pub error: ProcessError,
    /// Whether the order ran out of attempts with this failure.
    pub parked: bool,
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The order does not exist: retrying cannot help.
    #[error("order {0} does not exist")]
    OrderMissing(OrderId),
    /// PostgreSQL failed; worth retrying.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The batched statement of this job's transition failed; worth retrying.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The handler panicked: a bug, or data it cannot handle.
    #[error("panicked: {0}")]
    Panicked(String),
}

impl ProcessError {
    /// Whether a retry could succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::OrderMissing(_))
    }
}

impl Processor {
    /// A processor for the worker named `worker_name`. Starts its two batchers (claims and completions) on the
    /// current Tokio runtime.
    pub fn new(
        db: PgPool,
        worker_name: impl Into<String>,
        lease: Duration,
        stage_delay: Duration,
    ) -> Self {
        let max_attempts = i32::from(DEFAULT_MAX_ATTEMPTS);
        Self {
            claims: claim_batcher(&db, lease, max_attempts),
            completions: completion_batcher(&db),
            db,
            worker_name: worker_name.into(),
            lease,
            stage_delay,
            max_attempts,
            counts: Default::default(),
        }
    }

    /// The jobs this processor runs now and the orders it has completed (for the console's worker card).
    pub fn counts(&self) -> &std::sync::Arc<crate::console::JobCounts> {
        &self.counts
    }

    /// The same processor, parking an order after `max_attempts` attempts instead of the default 5.
    pub fn with_max_attempts(mut self, max_attempts: u16) -> Self {
        self.max_attempts = i32::from(max_attempts.max(1));
        self.claims = claim_batcher(&self.db, self.lease, self.max_attempts);
        self
    }

    /// Handles one job as [`process`](Self::process) does, and counts a failure, a panic included, as one of
    /// the order's attempts (unless its claim counted it already). The failure that uses up the last attempt
    /// parks the order.
    pub async fn run_job(&self, id: OrderId) -> Result<Outcome, JobFailure> {
        let claimed = AtomicBool::new(false);
        let result = AssertUnwindSafe(self.process_counting(id, &claimed))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(ProcessError::Panicked(panic_message(panic.as_ref()))));
        let error = match result {
            Ok(outcome) => return Ok(outcome),
            Err(error) if error.is_permanent() => {
                return Err(JobFailure {
                    error,
                    parked: false,
                });
            }
            Err(error) => error,
        };
        let counted = claimed.load(Ordering::Relaxed);
        let parked = match db::record_failure(
            &self.db,
            id,
            &error.to_string(),
            !counted,
            self.max_attempts,
        )
        .await
        {
            Ok(parked) => parked,
            Err(err) => {
                // The database is failing too: the attempt goes uncounted, as a transient fault should.
                tracing::warn!(order_id = %id, error = %err, "cannot record the failed attempt");
                false
            }
        };
        if parked {
            self.report_parked(id, &error);
        }
        Err(JobFailure { error, parked })
    }

    /// The error line and the metric of an order that was just parked.
    fn report_parked(&self, id: OrderId, cause: &dyn std::fmt::Display) {
        tracing::error!(order_id = %id, cause = %cause, attempts = self.max_attempts, "order parked: out of attempts; `worker requeue` re-drives it");
        metrics::counter!("orders_parked_total").increment(1);
    }

    /// Step 1: claims the order for processing, or tells why not.
    pub async fn claim(&self, id: OrderId) -> Result<Result<Claim, OrderStatus>, ProcessError> {
        let token = format!("{}/{}", self.worker_name, Uuid::now_v7());
        let attempt = Attempt {
            id,
            token: token.clone(),
        };
        if let Some(previous) = self.claims.run(attempt).await? {
            if previous == OrderStatus::Processing {
                // Not a transition: the order stays PROCESSING, and its history and streams say so once.
                tracing::warn!(order_id = %id, "took over an order whose worker's lease expired");
                metrics::counter!("worker_lease_takeovers_total").increment(1);
            } else {
                tracing::info!(order_id = %id, from = previous.as_str(), to = "PROCESSING", "order transition");
                metrics::counter!("order_transitions_total", "to" => "PROCESSING").increment(1);
            }
            return Ok(Ok(Claim { token, previous }));
        }
        match db::order_status(&self.db, id).await? {
            Some(status) => Ok(Err(status)),
            None => Err(ProcessError::OrderMissing(id)),
        }
    }

    /// Step 2: completes a claimed order. False if the claim was lost meanwhile.
    pub async fn complete(&self, id: OrderId, claim: &Claim) -> Result<bool, ProcessError> {
        let attempt = Attempt {
            id,
            token: claim.token.clone(),
        };
        let done = self.completions.run(attempt).await?;
        if done {
            tracing::info!(order_id = %id, from = "PROCESSING", to = "COMPLETED", "order transition");
            metrics::counter!("order_transitions_total", "to" => "COMPLETED").increment(1);
        } else {
            tracing::warn!(order_id = %id, "lease lost while processing: another worker completes the order");
        }
        Ok(done)
    }

    /// Handles one job in two stages, like the original service: a stage of simulated intake work, then
    /// PENDING → PROCESSING, a stage of simulated processing work, then PROCESSING → COMPLETED. An order that
    /// is already finished is skipped at once, without waiting.
    pub async fn process(&self, id: OrderId) -> Result<Outcome, ProcessError> {
        self.process_counting(id, &AtomicBool::new(false)).await
    }

    /// [`process`](Self::process), setting `claimed` once the claim has counted this attempt.
    async fn process_counting(
        &self,
        id: OrderId,
        claimed: &AtomicBool,
    ) -> Result<Outcome, ProcessError> {
        // The look before the first stage spares a finished order its wait; with no wait, the claim alone decides.
        if !self.stage_delay.is_zero() {
            match db::order_status(&self.db, id).await? {
                None => return Err(ProcessError::OrderMissing(id)),
                Some(status @ (OrderStatus::Completed | OrderStatus::Cancelled)) => {
                    tracing::info!(order_id = %id, status = status.as_str(), "nothing to do for this order");
                    return Ok(Outcome::Skipped(status));
                }
                // A duplicate job (the reconciler re-pushes by age) for an order another worker is on: skip it now
                // rather than hold a slot through a stage only to find the lease taken.
                Some(OrderStatus::Processing) if db::is_leased(&self.db, id).await? => {
                    tracing::info!(order_id = %id, "order held by another worker's live lease; nothing to do");
                    return Ok(Outcome::Skipped(OrderStatus::Processing));
                }
                Some(OrderStatus::Pending | OrderStatus::Processing) => {}
            }
        }
        tokio::time::sleep(self.stage_delay).await;
        let claim = match self.claim(id).await? {
            Ok(claim) => claim,
            Err(status @ (OrderStatus::Pending | OrderStatus::Processing))
                if db::park_exhausted(&self.db, id, self.max_attempts).await? =>
            {
                self.report_parked(id, &format!("every claim was lost ({})", status.as_str()));
                return Ok(Outcome::Parked);
            }
            Err(status) => {
                tracing::info!(order_id = %id, status = status.as_str(), "nothing to do for this order");
                return Ok(Outcome::Skipped(status));
            }
        };
        claimed.store(true, Ordering::Relaxed);
        tokio::time::sleep(self.stage_delay).await;
        Ok(if self.complete(id, &claim).await? {
            Outcome::Completed
        } else {
            Outcome::LostLease
        })
    }
}

/// A batcher of attempts over `db`, running at most [`BATCHES_IN_FLIGHT`] statements at once. No bound on the
/// attempts waiting: there are at most `WORKER_CONCURRENCY` jobs, each waiting on one attempt at a time.
fn batcher<O, F, Fut>(db: &PgPool, run_abandoned: bool, run: F) -> Batcher<Attempt, O>
where
    O: Send + 'static,
    F: Fn(PgPool, Vec<Attempt>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = sqlx::Result<Vec<O>>> + Send + 'static,
{
    let pool = usize::try_from(db.options().get_max_connections()).unwrap_or(1);
    let db = db.clone();
    let limits = Limits {
        run_abandoned,
        ..Limits::new(MAX_BATCH, BATCHES_IN_FLIGHT.min(pool))
    };
    Batcher::spawn(limits, move |batch, _gate| run(db.clone(), batch))
}

/// Claims in batches: each attempt gets its order's previous status if its token won the order.
///
/// The claim of a job that is gone (its future dropped: a shutdown that timed out, a consumer stopped) before its
/// batch formed is not run: nobody would work on the order, which would sit `PROCESSING` until its lease ran out
/// and count an attempt. One already in a running statement is not held back at its commit (no [`Gate`] here)
/// and that is harmless: a claim only sets a lease nobody renews, so the order is taken over when the lease
/// expires and the reconciler re-pushes it, exactly as after a worker killed between its claim and its
/// completion; the attempt it counted is one a crash would have counted too.
///
/// [`Gate`]: orders_core::db::batch::Gate
fn claim_batcher(
    db: &PgPool,
    lease: Duration,
    max_attempts: i32,
) -> Batcher<Attempt, Option<OrderStatus>> {
    batcher(db, false, move |db, batch| async move {
        let claimed = db::claim_for_processing(&db, &batch, lease, max_attempts).await?;
        Ok(batch
            .iter()
            .map(|attempt| {
                claimed
                    .iter()
                    .find(|(token, _)| *token == attempt.token)
                    .map(|(_, previous)| *previous)
            })
            .collect())
    })
}

/// Completions in batches: each attempt learns whether its token still held the order.
///
/// A completion is run even when its job is gone by then: it comes after both stages, so the work is done, and
/// the update applies only while the attempt's token still holds the order's lease. Completing it is what the
/// job was about to do; leaving it would have the order redone from the start after its lease. A job that comes
/// again for the order (a retry, the reconciler's re-push) finds it `COMPLETED` and skips it.
fn completion_batcher(db: &PgPool) -> Batcher<Attempt, bool> {
    batcher(db, true, |db, batch| async move {
        let completed = db::complete_processing(&db, &batch).await?;
        Ok(batch
            .iter()
            .map(|attempt| completed.contains(&attempt.token))
            .collect())
    })
}

/// The text of a panic's payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
