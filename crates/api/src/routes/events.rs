//! Live order status as server-sent events: one order until it is done, or every order of the caller for as long
//! as the client stays connected. See `crate::events` for where the changes come from.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    extract::State,
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures_util::stream::{self, Stream};
use orders_core::{
    db::{
        events::{self, StatusChange},
        orders as db,
    },
    domain::{Order, OrderId, UserId},
};
use sqlx::PgPool;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::AuthUser,
    error::{ApiError, ApiResult, ErrorBody, ValidationErrorBody},
    events::{Slot, Subscription, Topic},
    extract::OrderPath,
    loc,
    routes::orders::order_json,
    state::AppState,
};

/// How often a quiet stream sends a comment line, so that proxies and clients see it alive.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The two streams.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(order_events))
        .routes(routes!(my_order_events))
}

/// Watches one of my orders: its status now, then each change as it happens, until it is COMPLETED or CANCELLED.
///
/// `text/event-stream`. Every event is `event: status`, with `id:` the change's id and `data:` the order as JSON
/// (the same object as `GET /orders/{id}`, as of that change). The first event is the order as it is now (id 0
/// while it has not changed yet). A comment line (`:heartbeat`) comes every 15 s. A client that reconnects with
/// `Last-Event-ID` gets every change after that id, and no event twice.
#[utoipa::path(get, path = "/orders/{id}/events", tag = "orders", security(("bearer" = [])),
    params(
        ("id" = uuid::Uuid, Path, description = "The order's id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "The id of the last event received: the stream resumes after it (sent by browsers' EventSource on reconnect)"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "Events `status`, each with `id` and the order as JSON `data`; the stream ends after COMPLETED or CANCELLED", example = json!("event: status\nid: 0\ndata: {\"id\":\"01a2…\",\"status\":\"PENDING\",…}\n\n")),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token"),
        (status = 404, body = ErrorBody, description = "No such order of yours"),
        (status = 422, body = ValidationErrorBody, description = "Malformed id or Last-Event-ID"),
        (status = 429, body = ErrorBody, description = "SSE_MAX_STREAMS_PER_USER streams (10 by default) are open already", headers(("Retry-After" = u64))),
        (status = 503, body = ErrorBody, description = "PostgreSQL unavailable, or this server holds SSE_MAX_STREAMS streams", headers(("Retry-After" = u64))),
    ))]
async fn order_events(
    State(state): State<AppState>,
    user: AuthUser,
    OrderPath(id): OrderPath,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let after = last_event_id(&headers)?;
    let slot = state.events.open(user.user_id).await?;
    // Subscribed before anything is read, so that no change falls between the read and the first one sent.
    let feed = state.events.subscribe(Topic::Order(id));
    let Some(order) = db::find_order(&state.db, user.user_id, id).await? else {
        return Err(ApiError::NotFound("Order not found"));
    };
    let mut watch = OrderWatch {
        db: state.db.clone(),
        feed,
        _slot: slot,
        order: order.id,
        cursor: 0,
        queue: VecDeque::new(),
        done: false,
    };
    let final_now = order.status.is_final();
    match after {
        Some(after) => {
            watch.cursor = after;
            let missed = events::changes_of_order(&watch.db, id, after).await?;
            missed.into_iter().for_each(|change| watch.push(change));
            // Nothing missed and nothing more to come.
            if watch.queue.is_empty() && final_now {
                watch.done = true;
            }
        }
        None => {
            let last = events::last_change_of_order(&watch.db, id).await?;
            watch.cursor = last;
            watch.done = final_now;
            watch.queue.push_back(status_event(last, order));
        }
    }
    Ok(sse(stream::unfold(watch, OrderWatch::next)))
}

/// Watches all my orders: each status change of any of them as it happens, for as long as I stay connected.
///
/// `text/event-stream`, with the same events as `GET /orders/{id}/events` (`event: status`, the change's `id`,
/// the order as JSON `data`), from the moment of connecting, or after `Last-Event-ID` when reconnecting. Creating
/// an order is not a change: its first event is PROCESSING (or CANCELLED). A comment line comes every 15 s.
#[utoipa::path(get, path = "/orders/events", tag = "orders", security(("bearer" = [])),
    params(
        ("Last-Event-ID" = Option<i64>, Header, description = "The id of the last event received: the stream resumes after it"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "Events `status`, each with `id` and the order as JSON `data`", example = json!("event: status\nid: 42\ndata: {\"id\":\"01a2…\",\"status\":\"PROCESSING\",…}\n\n")),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token"),
        (status = 422, body = ValidationErrorBody, description = "Malformed Last-Event-ID"),
        (status = 429, body = ErrorBody, description = "SSE_MAX_STREAMS_PER_USER streams (10 by default) are open already", headers(("Retry-After" = u64))),
        (status = 503, body = ErrorBody, description = "PostgreSQL unavailable, or this server holds SSE_MAX_STREAMS streams", headers(("Retry-After" = u64))),
    ))]
async fn my_order_events(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let after = last_event_id(&headers)?;
    let slot = state.events.open(user.user_id).await?;
    let feed = state.events.subscribe(Topic::User(user.user_id));
    if orders_core::db::users::find_user(&state.db, user.user_id)
        .await?
        .is_none()
    {
        return Err(ApiError::Unauthorized("User no longer exists"));
    }
    let mut watch = UserWatch {
        db: state.db.clone(),
        feed,
        _slot: slot,
        user: user.user_id,
        floor: 0,
        sent: HashMap::new(),
        queue: VecDeque::new(),
    };
    match after {
        Some(after) => {
            watch.floor = after;
            watch.catch_up().await?;
        }
        None => watch.floor = events::last_change(&watch.db).await?,
    }
    Ok(sse(stream::unfold(watch, UserWatch::next)))
}

fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
        .into_response()
}

/// The `Last-Event-ID` header: an event id this api sent (a whole number, 0 or more).
fn last_event_id(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(raw) = headers.get("last-event-id") else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .filter(|id| *id >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::field(
                loc!["header", "Last-Event-ID"],
                "int_parsing",
                "Last-Event-ID must be the id of an event this stream sent",
            )
        })
}

/// One `status` event: `order` as of the change `id`.
fn status_event(id: i64, order: Order) -> Event {
    let data = order_json(&order).unwrap_or_default();
    Event::default()
        .event("status")
        .id(id.to_string())
        .data(data)
}

/// What woke a stream.
enum Next {
    Change(StatusChange),
    CatchUp,
    Stop,
}

/// Waits for the next change of the stream's topic, a reason to read the history, or the shutdown.
async fn next_signal(feed: &mut Subscription) -> Next {
    if feed.lagged.swap(false, Ordering::Relaxed) {
        return Next::CatchUp;
    }
    tokio::select! {
        () = feed.shutdown.cancelled() => Next::Stop,
        change = feed.changes.recv() => change.map_or(Next::Stop, |change| Next::Change(Arc::unwrap_or_clone(change))),
        resync = feed.resync.recv() => match resync {
            // The listener reconnected (or, lagged, did so often): read the history.
            Ok(()) | Err(RecvError::Lagged(_)) => Next::CatchUp,
            Err(RecvError::Closed) => Next::Stop,
        },
    }
}

/// The state of one order's stream.
struct OrderWatch {
    db: PgPool,
    feed: Subscription,
    _slot: Slot,
    order: OrderId,
    /// The last change sent (or skipped as already known).
    cursor: i64,
    queue: VecDeque<Event>,
    /// A final status was queued: the stream ends once the queue is sent.
    done: bool,
}

impl OrderWatch {
    fn push(&mut self, change: StatusChange) {
        if change.id <= self.cursor || self.done {
            return;
        }
        self.cursor = change.id;
        self.done = change.order.status.is_final();
        self.queue.push_back(status_event(change.id, change.order));
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            match next_signal(&mut self.feed).await {
                Next::Change(change) => self.push(change),
                Next::CatchUp => {
                    // Boxed: rare, and inline its read would make every open stream's state larger.
                    match Box::pin(events::changes_of_order(&self.db, self.order, self.cursor))
                        .await
                    {
                        Ok(missed) => missed.into_iter().for_each(|change| self.push(change)),
                        // The client reconnects with Last-Event-ID and gets them then.
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot read missed order events; closing the stream");
                            return None;
                        }
                    }
                }
                Next::Stop => return None,
            }
        }
    }
}

/// The state of a stream of all of one user's orders.
struct UserWatch {
    db: PgPool,
    feed: Subscription,
    _slot: Slot,
    user: UserId,
    /// Changes up to this id were sent or came before the stream: catching up reads after it.
    floor: i64,
    /// The last change sent per order, so that a change read back from the history is not sent twice.
    sent: HashMap<OrderId, i64>,
    queue: VecDeque<Event>,
}

impl UserWatch {
    /// Queues `change` unless it was sent already.
    fn push(&mut self, change: StatusChange) {
        let order = change.order.id;
        if change.id <= self.floor || self.sent.get(&order).is_some_and(|last| change.id <= *last) {
            return;
        }
        if change.order.status.is_final() {
            // No change of it will follow.
            self.sent.remove(&order);
        } else {
            self.sent.insert(order, change.id);
        }
        self.queue.push_back(status_event(change.id, change.order));
    }

    /// Queues every change of the user's orders after `floor`, and moves `floor` to the last of them.
    async fn catch_up(&mut self) -> sqlx::Result<()> {
        loop {
            let missed = events::changes_of_user(&self.db, self.user, self.floor).await?;
            let full = missed.len() as i64 == events::USER_CHANGES_PAGE;
            let last = missed.last().map(|change| change.id);
            missed.into_iter().for_each(|change| self.push(change));
            if let Some(last) = last {
                self.floor = self.floor.max(last);
            }
            if !full {
                return Ok(());
            }
        }
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some((Ok(event), self));
            }
            match next_signal(&mut self.feed).await {
                Next::Change(change) => self.push(change),
                Next::CatchUp => {
                    // Boxed: rare, and inline its reads would make every open stream's state larger.
                    if let Err(err) = Box::pin(self.catch_up()).await {
                        tracing::warn!(error = %err, "cannot read missed order events; closing the stream");
                        return None;
                    }
                }
                Next::Stop => return None,
            }
        }
    }
}
