//! The console's overview: orders by status, the backlog in PostgreSQL and in Redis, the last hour's throughput
//! and latency. Counting millions of orders per request would cost far more than the answer is worth, so each api
//! process computes the overview in the background every `ADMIN_OVERVIEW_REFRESH_MS` and serves the last result
//! as it stands, saying how fresh it is (`as_of`); `GET /admin/overview/events` pushes each new one.
//!
//! What each refresh reads, so that it stays cheap however large the table:
//! - the finished orders (`COMPLETED`, `CANCELLED`) are counted in full every [`FULL_COUNT_INTERVAL`] only; in
//!   between, the status changes since the last count are added (a short walk of the history's primary key:
//!   history ids are given in commit order, so none is missed or counted twice);
//! - the unfinished and parked orders are counted from their partial indexes;
//! - the throughput and the latency come from `orders_completed_idx` (completion time, with the creation time);
//! - Redis's backlog is one round trip (`OrderQueue::depth`, as the backlog gauges read it).

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Extension,
    extract::State,
    http::header,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use chrono::{DateTime, Utc};
use orders_core::{
    db::{
        admin::{self as db, FinishedTotals},
        sessions,
    },
    domain::UserId,
    queue::OrderQueue,
};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ROLE_RECHECK, access::AdminUser};
use crate::{
    error::{ApiError, ApiResult},
    events::MaxLifetime,
    routes::events::HEARTBEAT,
    state::AppState,
};

/// How often the finished orders are counted in full (a scan of the whole table, about a second for 5,000,000
/// orders on two cores); in between, the changes since are added.
pub const FULL_COUNT_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Longest wait for a full count.
const FULL_COUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request waits for the first overview of a process that has just started.
const FIRST_OVERVIEW_WAIT: Duration = Duration::from_secs(3);

/// The orders by status.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct StatusCounts {
    /// Orders waiting for a worker.
    #[serde(rename = "PENDING")]
    pub pending: i64,
    /// Orders a worker holds.
    #[serde(rename = "PROCESSING")]
    pub processing: i64,
    /// Orders done.
    #[serde(rename = "COMPLETED")]
    pub completed: i64,
    /// Orders cancelled.
    #[serde(rename = "CANCELLED")]
    pub cancelled: i64,
}

/// Work waiting to be done.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct BacklogOverview {
    /// `PENDING` orders, not parked, whose job is not in Redis: they wait in PostgreSQL for room in the queue,
    /// and the worker's reconciler feeds them in, oldest first.
    pub postgres: i64,
    /// Jobs waiting in Redis to be fetched (`null` when Redis did not answer).
    pub redis: Option<u64>,
    /// Of those, jobs ready now.
    pub redis_active: Option<u64>,
    /// Of those, jobs due later (fresh pushes and retries).
    pub redis_scheduled: Option<u64>,
    /// When the oldest `PENDING` order was created (`null`: none).
    #[serde(serialize_with = "crate::timestamp::serialize_option")]
    pub oldest_pending_at: Option<DateTime<Utc>>,
}

/// Orders completed in one minute.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct MinuteOverview {
    /// The minute's start.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub minute: DateTime<Utc>,
    /// Orders completed in it.
    pub completed: i64,
}

/// Create-to-complete latency over the last hour.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct LatencyOverview {
    /// Orders completed in the last hour.
    pub completed: i64,
    /// Median, in milliseconds (`null` without completions).
    pub p50: Option<f64>,
    /// 99th percentile, in milliseconds.
    pub p99: Option<f64>,
}

/// The overview as served.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Overview {
    /// When these figures were read; the next refresh comes `refresh_ms` later.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub as_of: DateTime<Utc>,
    /// How often the overview is refreshed (`ADMIN_OVERVIEW_REFRESH_MS`).
    pub refresh_ms: u64,
    /// Orders by status.
    pub orders: StatusCounts,
    /// Parked orders: their attempts ran out, and they wait for an operator's re-drive.
    pub parked: i64,
    /// Work waiting, in PostgreSQL and in Redis.
    pub backlog: BacklogOverview,
    /// Orders completed in each of the last 60 minutes, oldest first; the last is the current minute, so far.
    pub completed_per_minute: Vec<MinuteOverview>,
    /// Create-to-complete latency of the orders completed in the last hour.
    pub latency_ms: LatencyOverview,
}

/// One computed overview: its number in this process (1, 2, ...; the id of its event) and its JSON.
#[derive(Debug, Clone)]
struct Published {
    number: u64,
    json: Arc<str>,
}

/// The overviews as they are computed: each handler and stream reads the latest. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OverviewFeed(watch::Receiver<Option<Published>>);

impl OverviewFeed {
    /// The latest overview, waiting up to `wait` for the first one.
    async fn latest(&self, wait: Duration) -> Option<Published> {
        let mut feed = self.0.clone();
        let ready = tokio::time::timeout(wait, feed.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(latest)) => latest.clone(),
            _ => None,
        }
    }
}

/// Computes the overview in the background: one per api process, run by `App::run_until_stopped`.
#[derive(Debug)]
pub struct OverviewRefresher {
    db: PgPool,
    queue: OrderQueue,
    every: Duration,
    redis_timeout: Duration,
    sender: watch::Sender<Option<Published>>,
}

/// The feed handlers read, and the refresher that fills it every `every`.
pub fn overview(
    db: PgPool,
    queue: OrderQueue,
    every: Duration,
    redis_timeout: Duration,
) -> (OverviewFeed, OverviewRefresher) {
    let (sender, receiver) = watch::channel(None);
    let refresher = OverviewRefresher {
        db,
        queue,
        every,
        redis_timeout,
        sender,
    };
    (OverviewFeed(receiver), refresher)
}

/// The finished orders as last counted, and when they were counted in full.
struct Finished {
    totals: FinishedTotals,
    counted_at: Instant,
}

impl OverviewRefresher {
    /// Refreshes the overview every `every` until `stop`. A refresh that fails leaves the last overview in place
    /// (its `as_of` then shows its age) and is tried again at the next tick.
    pub async fn run(self, stop: CancellationToken) {
        let mut finished: Option<Finished> = None;
        let mut number = 0;
        let mut every = tokio::time::interval(self.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let refresh = tokio::time::timeout(FULL_COUNT_TIMEOUT, self.refresh(&mut finished));
            match refresh.await {
                Ok(Ok(overview)) => match serde_json::to_string(&overview) {
                    Ok(json) => {
                        number += 1;
                        self.sender.send_replace(Some(Published {
                            number,
                            json: json.into(),
                        }));
                    }
                    Err(err) => tracing::error!(error = %err, "cannot serialize the overview"),
                },
                Ok(Err(err)) => tracing::warn!(error = %err, "cannot refresh the admin overview"),
                Err(_) => tracing::warn!("the admin overview's refresh took too long"),
            }
        }
    }

    /// One refresh, read in one snapshot (a read-only repeatable-read transaction), so that an order moving
    /// on meanwhile is counted once, under one status.
    async fn refresh(&self, finished: &mut Option<Finished>) -> sqlx::Result<Overview> {
        let mut tx = self
            .db
            .begin_with("begin isolation level repeatable read read only")
            .await?;
        let totals = match finished.as_mut() {
            Some(known) if known.counted_at.elapsed() < FULL_COUNT_INTERVAL => {
                let since = db::finished_since(&mut *tx, known.totals.last_change).await?;
                known.totals = FinishedTotals {
                    completed: known.totals.completed + since.completed,
                    cancelled: known.totals.cancelled + since.cancelled,
                    last_change: since.last_change,
                };
                known.totals
            }
            _ => {
                // A full count may outlast DATABASE_STATEMENT_TIMEOUT_MS on a big table; it has a bound of its own.
                sqlx::query("set local statement_timeout = 60000")
                    .execute(&mut *tx)
                    .await?;
                let totals = db::finished_totals(&mut *tx).await?;
                sqlx::query("set local statement_timeout to default")
                    .execute(&mut *tx)
                    .await?;
                *finished = Some(Finished {
                    totals,
                    counted_at: Instant::now(),
                });
                totals
            }
        };
        let unfinished = db::unfinished(&mut *tx).await?;
        let minutes = db::completed_per_minute(&mut *tx).await?;
        let latency = db::latency_last_hour(&mut *tx).await?;
        tx.commit().await?;
        let depth = self.queue.depth(self.redis_timeout).await.ok();
        Ok(Overview {
            as_of: Utc::now(),
            refresh_ms: self.every.as_millis() as u64,
            orders: StatusCounts {
                pending: unfinished.pending,
                processing: unfinished.processing,
                completed: totals.completed,
                cancelled: totals.cancelled,
            },
            parked: unfinished.parked,
            backlog: BacklogOverview {
                postgres: unfinished.waiting_in_postgres,
                redis: depth.map(|depth| depth.waiting()),
                redis_active: depth.map(|depth| depth.active),
                redis_scheduled: depth.map(|depth| depth.scheduled),
                oldest_pending_at: unfinished.oldest_pending,
            },
            completed_per_minute: minutes
                .into_iter()
                .map(|minute| MinuteOverview {
                    minute: minute.minute,
                    completed: minute.completed,
                })
                .collect(),
            latency_ms: LatencyOverview {
                completed: latency.completed,
                p50: latency.p50_ms,
                p99: latency.p99_ms,
            },
        })
    }
}

/// The overview: orders by status, parked orders, the backlog in PostgreSQL and in Redis, orders completed per
/// minute over the last hour, and the create-to-complete latency (p50, p99) over the last hour.
///
/// Computed in the background every `refresh_ms` by each api process, not per request: `as_of` says when. To
/// follow it without polling, use `GET /admin/overview/events`.
#[utoipa::path(get, path = "/admin/overview", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, body = Overview, description = "The latest overview"),
    (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
    (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
    (status = 503, body = crate::error::ErrorBody, description = "No overview computed yet (the process has just started, or PostgreSQL is unavailable)", headers(("Retry-After" = u64))),
))]
pub(super) async fn get_overview(
    State(state): State<AppState>,
    _admin: AdminUser,
) -> ApiResult<Response> {
    let latest = state
        .overview
        .latest(FIRST_OVERVIEW_WAIT)
        .await
        .ok_or_else(|| ApiError::Unavailable("no admin overview computed yet".into()))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        latest.json.to_string(),
    )
        .into_response())
}

/// One event of `GET /admin/overview/events`: `event: overview`, described as the order streams' events are (see
/// `openapi::StatusEvent`).
pub struct OverviewEvent;

impl utoipa::PartialSchema for OverviewEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::openapi::event(
            "overview",
            "The overview as one refresh computed it.",
            "The refresh's number in the api process that serves the stream; a reconnect starts from the latest \
             overview whatever `Last-Event-ID` it sends.",
            "The overview as JSON, the same object as `GET /admin/overview`.",
            utoipa::openapi::Ref::from_schema_name("Overview").into(),
        )
    }
}

impl ToSchema for OverviewEvent {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("OverviewEvent")
    }
}

/// The overview as server-sent events: `event: overview` with the same JSON as `GET /admin/overview`, now and
/// then at each refresh, until the access token expires, the reader loses the admin role or logs out (both within
/// 5 s), or the server stops (the client then reconnects, with a fresh token). Comment lines keep a quiet stream alive. Counts against the
/// caller's event streams (`SSE_MAX_STREAMS_PER_USER`).
#[utoipa::path(get, path = "/admin/overview/events", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, description = "Events `overview`, each with `id` and the overview as JSON `data`, at each refresh",
        content(("text/event-stream", item_schema = OverviewEvent, example = json!("event: overview\nid: 42\ndata: {\"as_of\":\"2026-12-06T01:48:58.897066Z\",\"refresh_ms\":2000,…}\n\n")))),
    (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
    (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded, or too many open event streams", headers(("Retry-After" = u64))),
    (status = 503, body = crate::error::ErrorBody, description = "This process holds as many event streams as it can", headers(("Retry-After" = u64))),
))]
pub(super) async fn overview_events(
    State(state): State<AppState>,
    Extension(MaxLifetime(max_lifetime)): Extension<MaxLifetime>,
    admin: AdminUser,
) -> ApiResult<Response> {
    let slot = state.events.open(admin.member.id).await?;
    let mut feed = state.overview.0.clone();
    // The overview as it stands goes first.
    feed.mark_changed();
    let expires_in = u64::try_from(admin.expires_at - Utc::now().timestamp()).unwrap_or(0);
    let mut lasts = Duration::from_secs(expires_in);
    if let Some(max) = max_lifetime {
        lasts = lasts.min(max);
    }
    let stream = OverviewStream {
        feed,
        ends_at: tokio::time::Instant::now() + lasts,
        shutdown: state.events.shutdown.clone(),
        db: state.db.clone(),
        reader: admin.member.id,
        session: admin.session,
        role_checked: Instant::now(),
        _slot: slot,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let latest = stream.next().await?;
        let event = Event::default()
            .event("overview")
            .id(latest.number.to_string())
            .data(&*latest.json);
        Some((Ok::<_, Infallible>(event), stream))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT))
        .into_response())
}

/// One reader's stream of overviews.
struct OverviewStream {
    feed: watch::Receiver<Option<Published>>,
    ends_at: tokio::time::Instant,
    shutdown: CancellationToken,
    db: PgPool,
    reader: UserId,
    /// The session the stream was opened in: it ends with it.
    session: Option<Uuid>,
    role_checked: Instant,
    /// The stream's place in the bounds on open streams, released when it ends.
    _slot: crate::events::Slot,
}

impl OverviewStream {
    /// The next overview to send; `None` when the stream ends.
    async fn next(&mut self) -> Option<Published> {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(self.ends_at) => return None,
                changed = self.feed.changed() => changed.ok()?,
            }
            let Some(latest) = self.feed.borrow_and_update().clone() else {
                continue;
            };
            if self.role_checked.elapsed() >= ROLE_RECHECK {
                // A database that does not answer ends the stream too: the client reconnects and is checked then.
                let member = db::find_member(&self.db, self.reader).await.ok()??;
                if !member.role.can_read_admin() {
                    return None;
                }
                // A logout (or a revoked session) ends it, as it ends the order streams.
                if let Some(session) = self.session {
                    let ended = sessions::ended_sessions(&self.db, &[session]).await.ok()?;
                    if !ended.is_empty() {
                        return None;
                    }
                }
                self.role_checked = Instant::now();
            }
            return Some(latest);
        }
    }
}
