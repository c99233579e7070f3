//! The live worker processes, from the cards they publish in Redis (see `orders_core::queue::console`).

use axum::{Json as JsonResponse, extract::State};
use chrono::{DateTime, Utc};
use orders_core::queue::console::{self, WorkerCard};
use serde::Serialize;
use utoipa::ToSchema;

use super::access::AdminUser;
use crate::{
    error::{ApiError, ApiResult},
    state::AppState,
};

/// One live worker process.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerResponse {
    /// Its name: unique per process and start, as in its logs and in the claim tokens (`locked_by`) of the
    /// orders it holds.
    #[schema(example = "worker-4242-0196f1c2a7e87a11b5e0c3d4f5a6b7c8")]
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// When it started.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub started_at: DateTime<Utc>,
    /// When it last reported (every 2 s; a worker silent for 6 s is no longer listed).
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub last_heartbeat: DateTime<Utc>,
    /// Jobs it is running now.
    pub in_flight: u64,
    /// Orders it has completed since it started.
    pub done: u64,
}

impl From<WorkerCard> for WorkerResponse {
    fn from(card: WorkerCard) -> Self {
        Self {
            id: card.id,
            host: card.host,
            started_at: card.started_at,
            last_heartbeat: card.last_heartbeat,
            in_flight: card.in_flight,
            done: card.done,
        }
    }
}

/// The live worker processes of this queue, oldest started first.
#[utoipa::path(get, path = "/admin/workers", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, body = Vec<WorkerResponse>, description = "Live workers"),
    (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
    (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
    (status = 503, body = crate::error::ErrorBody, description = "Redis unavailable", headers(("Retry-After" = u64))),
))]
pub(super) async fn list_workers(
    State(state): State<AppState>,
    _admin: AdminUser,
) -> ApiResult<JsonResponse<Vec<WorkerResponse>>> {
    let mut conn = state.queue.connection();
    let cards = console::live_workers(&mut conn, state.queue.keys(), state.enqueue_timeout)
        .await
        .map_err(|err| ApiError::Unavailable(err.to_string()))?;
    Ok(JsonResponse(cards.into_iter().map(Into::into).collect()))
}
