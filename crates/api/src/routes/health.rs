//! Liveness and readiness.
//!
//! Readiness covers what the requests need (PostgreSQL and Redis) and what the event streams need besides: the
//! process's listener. A replica whose listener has been down for
//! [`LISTENER_DOWN_AFTER`](crate::events::listener::LISTENER_DOWN_AFTER) keeps its streams open, heartbeats and
//! all, while no change reaches them: it is taken out of rotation like one that cannot reach PostgreSQL.

use std::{
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::state::AppState;

/// How long readiness waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe's result answers readiness checks before the next one probes again.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// The last probe of PostgreSQL and Redis, shared by the readiness checks of one process. The check needs no
/// token, so a flood of them must not each take a pool connection and a Redis round trip: one probe at most per
/// `PROBE_REUSE` is made, and the checks that arrive meanwhile (or wait on it) answer from its result.
#[derive(Debug, Default)]
pub struct Readiness {
    last: tokio::sync::Mutex<Option<(Instant, Probed)>>,
    /// What the last answer found (bit 0: PostgreSQL down, bit 1: Redis down, bit 2: the live-status listener
    /// down), to log changes only.
    reported: AtomicU8,
}

/// Whether each dependency answered.
#[derive(Debug, Clone, Copy)]
struct Probed {
    postgres: bool,
    redis: bool,
}

impl Readiness {
    /// The result of a probe made less than [`PROBE_REUSE`] ago, or of a new one.
    async fn probe(&self, state: &AppState) -> Probed {
        let mut last = self.last.lock().await;
        if let Some((at, probed)) = *last
            && at.elapsed() < PROBE_REUSE
        {
            return probed;
        }
        let postgres = async {
            let query = sqlx::query_scalar::<_, i32>("select 1").fetch_one(&state.db);
            matches!(tokio::time::timeout(PROBE_TIMEOUT, query).await, Ok(Ok(_)))
        };
        let redis = state.queue.ping(PROBE_TIMEOUT);
        let (postgres, redis) = tokio::join!(postgres, redis);
        let probed = Probed { postgres, redis };
        *last = Some((Instant::now(), probed));
        probed
    }
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(root))
        .routes(routes!(live))
        .routes(routes!(ready))
}

/// A short message.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    /// Always the same text.
    #[schema(example = "Orders API is running")]
    pub msg: String,
}

/// Liveness, kept from the original service.
#[utoipa::path(get, path = "/", tag = "health", responses((status = 200, body = Message, description = "The service runs")))]
async fn root() -> Json<Message> {
    Json(Message {
        msg: "Orders API is running".into(),
    })
}

/// Process status.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    /// `ok`.
    pub status: &'static str,
}

/// 200 while the process runs.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, body = Live, description = "The process runs")))]
async fn live() -> Json<Live> {
    Json(Live { status: "ok" })
}

/// Dependency status.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ok`, or why the service is not ready, naming what failed.
    #[schema(example = "ok")]
    pub status: String,
    /// `ok` or `unavailable`.
    pub postgres: &'static str,
    /// `ok` or `unavailable`.
    pub redis: &'static str,
    /// The live-status listener: `ok`, or `down` once it has not listened for 10 s (this process's event
    /// streams receive no change meanwhile).
    pub events: &'static str,
}

/// Readiness: 200 when PostgreSQL and Redis answer and the live-status listener listens, else 503 naming what failed.
///
/// The 503 body is `{"detail", "postgres", "redis", "events"}`: `detail` names what failed, the others are as in
/// the 200 body. PostgreSQL and Redis are probed at most once a second per process; checks in between answer from
/// the last probe. `events` is `down` once the listener has gone 10 s without listening (it finds a silent connection
/// within 5 s and replaces it at once, so a shorter gap is not reported).
#[utoipa::path(get, path = "/health/ready", tag = "health", responses(
    (status = 200, body = Ready, description = "PostgreSQL and Redis answer, and the live-status listener listens"),
    (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL or Redis is unreachable, or the live-status listener has been down for 10 s; `detail` names it"),
))]
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let Probed { postgres, redis } = state.readiness.probe(&state).await;
    let events = !state.events.listener.is_down();
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let events_word = if events { "ok" } else { "down" };
    let unreachable: Vec<&str> = [(postgres, "PostgreSQL"), (redis, "Redis")]
        .into_iter()
        .filter_map(|(ok, name)| (!ok).then_some(name))
        .collect();
    let mut failed = Vec::new();
    if !unreachable.is_empty() {
        failed.push(format!("{} unreachable", unreachable.join(" and ")));
    }
    if !events {
        let secs = state.events.listener.unheard_for().as_secs();
        failed.push(format!("live order status down (no listener for {secs} s)"));
    }
    // Probes come every few seconds: log a change of state, not every probe.
    let state_now = u8::from(!postgres) | (u8::from(!redis) << 1) | (u8::from(!events) << 2);
    let state_before = state.readiness.reported.swap(state_now, Ordering::Relaxed);
    if failed.is_empty() {
        if state_before != 0 {
            tracing::info!(
                "ready again: PostgreSQL and Redis answer, and the order events listener listens"
            );
        }
        (
            StatusCode::OK,
            Json(serde_json::json!(Ready {
                status: "ok".into(),
                postgres: "ok",
                redis: "ok",
                events: "ok",
            })),
        )
    } else {
        let detail = format!("Service unavailable: {}", failed.join("; "));
        if state_before != state_now {
            tracing::warn!(%detail, "not ready");
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "detail": detail,
                "postgres": word(postgres),
                "redis": word(redis),
                "events": events_word,
            })),
        )
    }
}
