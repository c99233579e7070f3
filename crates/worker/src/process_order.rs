//! The job handler. Jobs may arrive zero, one or many times, in any order, and after the order was cancelled;
//! every state change is a conditional update in PostgreSQL, so the outcome is the same in every case:
//! each order makes each transition at most once, and only the transitions the state machine allows.

use std::time::Duration;

use orders_core::{
    db::orders::{self as db, Claim},
    domain::{OrderId, OrderStatus},
};
use sqlx::PgPool;
use uuid::Uuid;

/// Moves orders along. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Processor {
    db: PgPool,
    worker_name: String,
    lease: Duration,
    stage_delay: Duration,
}

/// What handling one job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// PENDING (or an abandoned PROCESSING) → PROCESSING → COMPLETED.
    Completed,
    /// Nothing to do: the order is cancelled, completed, or held by a live lease of another worker.
    Skipped(OrderStatus),
    /// Another worker took the order over while this one worked (this one's lease had expired).
    LostLease,
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
}

impl ProcessError {
    /// Whether a retry could succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::OrderMissing(_))
    }
}

impl Processor {
    /// A processor for the worker named `worker_name`.
    pub fn new(
        db: PgPool,
        worker_name: impl Into<String>,
        lease: Duration,
        stage_delay: Duration,
    ) -> Self {
        Self {
            db,
            worker_name: worker_name.into(),
            lease,
            stage_delay,
        }
    }

    /// Step 1: claims the order for processing, or tells why not.
    pub async fn claim(&self, id: OrderId) -> Result<Result<Claim, OrderStatus>, ProcessError> {
        let token = format!("{}/{}", self.worker_name, Uuid::now_v7());
        if let Some(claim) = db::claim_for_processing(&self.db, id, &token, self.lease).await? {
            if claim.previous == OrderStatus::Processing {
                tracing::warn!(order_id = %id, "took over an order whose worker's lease expired");
            }
            tracing::info!(order_id = %id, from = claim.previous.as_str(), to = "PROCESSING", "order transition");
            metrics::counter!("order_transitions_total", "to" => "PROCESSING").increment(1);
            return Ok(Ok(claim));
        }
        match db::order_status(&self.db, id).await? {
            Some(status) => Ok(Err(status)),
            None => Err(ProcessError::OrderMissing(id)),
        }
    }

    /// Step 2: completes a claimed order. False if the claim was lost meanwhile.
    pub async fn complete(&self, id: OrderId, claim: &Claim) -> Result<bool, ProcessError> {
        let done = db::complete_processing(&self.db, id, claim).await?;
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
        tokio::time::sleep(self.stage_delay).await;
        let claim = match self.claim(id).await? {
            Ok(claim) => claim,
            Err(status) => {
                tracing::info!(order_id = %id, status = status.as_str(), "nothing to do for this order");
                return Ok(Outcome::Skipped(status));
            }
        };
        tokio::time::sleep(self.stage_delay).await;
        Ok(if self.complete(id, &claim).await? {
            Outcome::Completed
        } else {
            Outcome::LostLease
        })
    }
}
