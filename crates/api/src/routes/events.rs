//! Live order status as server-sent events: one order until it is done, or every order of the caller for as long
//! as the client stays connected. See `crate::events` for where the changes come from.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    Extension,
    extract::State,
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::Stream};
use orders_core::{
    db::{
        events::{self, StatusChange},
        orders as db,
    },
    domain::{Order, OrderId, UserId},
};
use sqlx::PgPool;
use tokio::{sync::Semaphore, time::Instant};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::{AuthUser, StreamUser, events_cookie},
    config::RateLimits,
    error::{ApiError, ApiResult, ErrorBody, ValidationErrorBody},
    events::{MaxLifetime, Signal, Slot, Subscription, Topic, authority::Authority, stream_routes},
    extract::OrderPath,
    loc,
    openapi::{MyOrdersEvent, StatusEvent},
    rate_limit::RouteLimits,
    routes::orders::order_json,
    state::AppState,
};

/// How often a quiet stream sends a comment line, so that proxies and clients see it alive.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The two streams, opened within one rate limit (`RATE_LIMIT_OPEN_STREAM_PER_MINUTE`: a stream reads history
/// when it opens, so opening and closing them in a loop must not be free), and the cookie that lets a browser's
/// `EventSource` open them. A stream lasts at most `max_lifetime` (`SSE_MAX_STREAM_SECONDS`), when set.
pub fn router(
    limits: &RateLimits,
    per_route: &RouteLimits,
    max_lifetime: Option<Duration>,
) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(stream_routes(
            per_route,
            OpenApiRouter::new()
                .routes(routes!(order_events))
                .routes(routes!(my_order_events)),
            "open_stream",
            limits.rate_limit_open_stream_per_minute,
            max_lifetime,
        ))
        .routes(routes!(events_cookie_for_browsers))
}

/// Counts one more stream opened by `user` against `RATE_LIMIT_OPEN_STREAM_PER_MINUTE` per user, over every api
/// process: `429` with `Retry-After` past it. The route's limit per client holds besides (and alone, while Redis
/// does not answer), so a user opening streams from many addresses is limited too.
async fn limit_openings(state: &AppState, user: &AuthUser) -> ApiResult<()> {
    let Some((limits, per_minute)) = &state.stream_openings else {
        return Ok(());
    };
    match limits
        .decide("open_stream_user", user.user_id, *per_minute)
        .await
    {
        Some(crate::rate_limit::shared::Decision::Refused { wait }) => {
            Err(ApiError::TooManyRequests {
                retry_after_secs: wait.as_millis().div_ceil(1000).max(1) as u64,
            })
        }
        _ => Ok(()),
    }
}

/// The authority a stream is opened with: it ends with it.
fn authority(user: &AuthUser) -> Authority {
    Authority {
        session: user.session,
        expires_at: user.expires_at,
    }
}

/// Lets a web page subscribe with a browser's native `EventSource`, which cannot send an `Authorization` header.
///
/// Sets the `order_events` cookie: an event-stream token of the caller's session that expires with the access
/// token presented here. It is HttpOnly, SameSite=Strict and Secure, sent only to `/orders` paths, and only the two
/// event routes accept it: it lets a page read its user's order events and do nothing else. Call it again with
/// each new access token; a stream opened with it ends when it expires (the `EventSource` then gets `401` and
/// stops) or when the session ends.
#[utoipa::path(post, path = "/orders/events/cookie", tag = "orders", security(("bearer" = [])),
    responses(
        (status = 204, description = "The cookie is set", headers(("Set-Cookie" = String, description = "order_events=...; HttpOnly; Secure; SameSite=Strict; Path=/orders; Max-Age=<the access token's remaining life>"))),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    ))]
async fn events_cookie_for_browsers(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<Response> {
    let expires_at = chrono::DateTime::from_timestamp(user.expires_at, 0)
        .ok_or(ApiError::Unauthorized("Invalid or expired token"))?;
    let token = state.jwt.issue_until(
        user.user_id,
        crate::auth::jwt::TokenKind::Events,
        uuid::Uuid::new_v4(),
        user.session,
        Some(expires_at),
    )?;
    let max_age = (token.expires_at - chrono::Utc::now()).num_seconds().max(0);
    let mut response = axum::http::StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        axum::http::header::SET_COOKIE,
        events_cookie(&token.token, u64::try_from(max_age).unwrap_or(0)),
    );
    Ok(response)
}

/// Watches one of my orders: its status now, then each change as it happens, until it is COMPLETED or CANCELLED.
///
/// `text/event-stream`. Every event is `event: status`, with `id:` the change's id and `data:` the order as JSON
/// (the same object as `GET /orders/{id}`, as of that change). The first event is the order as it is now (id 0
/// while it has not changed yet). A comment line (`:heartbeat`) comes every 15 s. A client that reconnects with
/// `Last-Event-ID` gets every change after that id, and no event twice; once it has them all and the order is
/// finished, the answer is `204`, which tells an `EventSource` to stop reconnecting.
///
/// Authenticated by the access token, or by the `order_events` cookie (see `POST /orders/events/cookie`). The
/// stream ends when that token expires, and within 2 s of its session ending (logout, or a revoked session):
/// reconnect with a fresh token and `Last-Event-ID` to resume.
///
/// **Watching it live.** Swagger UI shows an answer only once it has ended: Execute here waits until the order is
/// finished, then shows every event at once. To see each event as it comes, from a terminal:
/// `curl -sN http://localhost:8000/orders/ORDER_ID/events -H "Authorization: Bearer $TOKEN"`; from a page of this
/// origin: `await fetch('/orders/events/cookie', {method: 'POST', headers: {Authorization: 'Bearer ' + token}})`,
/// then `new EventSource('/orders/ORDER_ID/events').addEventListener('status', e => console.log(e.data))`.
#[utoipa::path(get, path = "/orders/{id}/events", tag = "orders", security(("bearer" = [])),
    params(
        ("id" = uuid::Uuid, Path, description = "The order's id"),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "The id of the last event received: the stream resumes after it (sent by browsers' EventSource on reconnect). Event ids are whole numbers, 0 or more"),
    ),
    responses(
        (status = 200, description = "Events `status`, each with `id` and the order as JSON `data`; the stream ends after COMPLETED or CANCELLED",
            content(("text/event-stream", item_schema = StatusEvent, example = json!("event: status\nid: 0\ndata: {\"id\":\"01a2…\",\"status\":\"PENDING\",…}\n\n")))),
        (status = 204, description = "Nothing more to send: the order is finished and `Last-Event-ID` was its last change"),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 404, body = ErrorBody, description = "No such order of yours", example = json!({"detail": "Order not found"})),
        (status = 422, body = ValidationErrorBody, description = "Malformed id or Last-Event-ID", example = json!({"detail": [{"loc": ["path", "id"], "msg": "Input should be a valid UUID, invalid character: found `n` at 0", "type": "uuid_parsing"}]})),
        (status = 429, body = ErrorBody, description = "SSE_MAX_STREAMS_PER_USER streams (10 by default) are open already, or 30 streams were opened in the last minute by this client or this user (RATE_LIMIT_OPEN_STREAM_PER_MINUTE)", headers(("Retry-After" = u64))),
        (status = 503, body = ErrorBody, description = "PostgreSQL unavailable, or this server holds SSE_MAX_STREAMS streams", headers(("Retry-After" = u64))),
    ))]
async fn order_events(
    State(state): State<AppState>,
    StreamUser(user): StreamUser,
    OrderPath(id): OrderPath,
    Extension(lifetime): Extension<MaxLifetime>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let after = last_event_id(&headers)?;
    limit_openings(&state, &user).await?;
    let reader = OrderReader {
        user: user.user_id,
        authority: authority(&user),
        owner: Some(user.user_id),
    };
    order_stream(&state, reader, id, after, lifetime, std::future::pending()).await
}

/// Who opens a stream of one order: the user whose streams it counts against, the authority it ends with, and the
/// owner the order must have (`None`: any order, for the admin API).
pub(crate) struct OrderReader {
    /// Whose streams it counts against (`SSE_MAX_STREAMS_PER_USER`).
    pub user: UserId,
    /// The token and session it ends with.
    pub authority: Authority,
    /// The order's owner, checked; `None`: any order.
    pub owner: Option<UserId>,
}

/// The stream of one order: its status now (or what came after `after`, the `Last-Event-ID`), then each change
/// until it is finished, `lifetime` is over, its authority ends, or `until` resolves; `204` when nothing more will
/// come; `404` when there is no such order (of its owner).
pub(crate) async fn order_stream(
    state: &AppState,
    reader: OrderReader,
    id: OrderId,
    after: Option<i64>,
    lifetime: MaxLifetime,
    until: impl Future<Output = ()> + Send + 'static,
) -> ApiResult<Response> {
    let slot = state.events.open(reader.user).await?;
    // Subscribed before anything is read, so that no change falls between the read and the first one sent.
    let feed = state.events.subscribe(Topic::Order(id), reader.authority);
    // The order and its last change in one snapshot: read apart, a change committing in between was sent with the
    // old status under its own id, and its announcement then dropped as already sent.
    let Some((order, last)) = db::find_order_and_last_change(&state.db, reader.owner, id).await?
    else {
        return Err(ApiError::NotFound("Order not found"));
    };
    let stream = match after {
        Some(after) => {
            let missed = events::changes_of_order(&state.db, id, after).await?;
            // Nothing missed, and nothing more to come: 204, the one answer that stops an EventSource's reconnects.
            if missed.is_empty() && order.status.is_final() {
                return Ok(axum::http::StatusCode::NO_CONTENT.into_response());
            }
            let mut stream =
                EventStream::new(feed, &state.db, slot, Scope::order(id, after, false));
            stream.caught_up(&missed);
            stream
        }
        None => {
            let scope = Scope::order(id, last, order.status.is_final());
            let mut stream = EventStream::new(feed, &state.db, slot, scope);
            stream.queue.push_back(status_event(last, &order));
            stream
        }
    };
    Ok(sse(stream.take_until(until), lifetime))
}

/// Watches all my orders: each status change of any of them as it happens, for as long as I stay connected.
///
/// `text/event-stream`, with the same events as `GET /orders/{id}/events` (`event: status`, the change's `id`,
/// the order as JSON `data`), from the moment of connecting, or after `Last-Event-ID` when reconnecting. Creating
/// an order is not a change: its first event is PROCESSING (or CANCELLED). A comment line comes every 15 s.
///
/// A `Last-Event-ID` more than 1,000 changes of mine back is not replayed: the first event is then `event: reset`
/// (its `id` the latest change, its `data` `{"detail", "replays_at_most"}`), and the stream goes on from now; reload
/// the orders with `GET /orders/my-orders`.
///
/// Authenticated, and ended, as `GET /orders/{id}/events` is.
///
/// **Watching it live.** This stream stays open, and Swagger UI shows an answer only once it has ended: Execute
/// here waits for as long as the stream lasts, with nothing on the page. Watch it from a terminal instead:
/// `curl -sN http://localhost:8000/orders/events -H "Authorization: Bearer $TOKEN"` (Ctrl-C to stop), and create or
/// cancel orders meanwhile; or from a page of this origin: `await fetch('/orders/events/cookie', {method: 'POST',
/// headers: {Authorization: 'Bearer ' + token}})`, then
/// `new EventSource('/orders/events').addEventListener('status', e => console.log(e.data))`.
#[utoipa::path(get, path = "/orders/events", tag = "orders", security(("bearer" = [])),
    params(
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "The id of the last event received: the stream resumes after it. Event ids are whole numbers, 0 or more"),
    ),
    responses(
        (status = 200, description = "Events `status`, each with `id` and the order as JSON `data` (and `reset` first, when `Last-Event-ID` is too far back)",
            content(("text/event-stream", item_schema = MyOrdersEvent, example = json!("event: status\nid: 42\ndata: {\"id\":\"01a2…\",\"status\":\"PROCESSING\",…}\n\n")))),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 422, body = ValidationErrorBody, description = "Malformed Last-Event-ID", example = json!({"detail": [{"loc": ["header", "Last-Event-ID"], "msg": "Last-Event-ID must be the id of an event this stream sent", "type": "int_parsing"}]})),
        (status = 429, body = ErrorBody, description = "SSE_MAX_STREAMS_PER_USER streams (10 by default) are open already, or 30 streams were opened in the last minute by this client or this user (RATE_LIMIT_OPEN_STREAM_PER_MINUTE)", headers(("Retry-After" = u64))),
        (status = 503, body = ErrorBody, description = "PostgreSQL unavailable, or this server holds SSE_MAX_STREAMS streams", headers(("Retry-After" = u64))),
    ))]
async fn my_order_events(
    State(state): State<AppState>,
    StreamUser(user): StreamUser,
    Extension(lifetime): Extension<MaxLifetime>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let after = last_event_id(&headers)?;
    limit_openings(&state, &user).await?;
    let slot = state.events.open(user.user_id).await?;
    let feed = state
        .events
        .subscribe(Topic::User(user.user_id), authority(&user));
    if orders_core::db::users::find_user(&state.db, user.user_id)
        .await?
        .is_none()
    {
        return Err(ApiError::Unauthorized("User no longer exists"));
    }
    let stream = match after {
        // The first page of what was missed now (a database error is still an error response); the rest as the
        // stream is read.
        // Too far back: the history is not replayed; the client reloads the state instead.
        Some(after)
            if events::user_changes_exceed(&state.db, user.user_id, after, RESUME_MAX_CHANGES)
                .await? =>
        {
            let floor = events::last_change(&state.db).await?;
            let mut stream =
                EventStream::new(feed, &state.db, slot, Scope::user(user.user_id, floor));
            stream.queue.push_back(reset_event(floor));
            stream
        }
        Some(after) => {
            let missed = events::changes_of_user(&state.db, user.user_id, after).await?;
            let mut stream =
                EventStream::new(feed, &state.db, slot, Scope::user(user.user_id, after));
            stream.caught_up(&missed);
            stream
        }
        None => {
            let floor = events::last_change(&state.db).await?;
            EventStream::new(feed, &state.db, slot, Scope::user(user.user_id, floor))
        }
    };
    Ok(sse(stream, lifetime))
}

/// Most changes a resumed `/orders/events` replays: further back, it sends `reset_event` instead.
pub const RESUME_MAX_CHANGES: i64 = 1000;

/// `event: reset`: more than [`RESUME_MAX_CHANGES`] changes were missed, so the stream goes on from now, after
/// `floor` (its id, so that the next reconnect resumes from there), and the client reloads its orders.
fn reset_event(floor: i64) -> Event {
    let data = serde_json::json!({
        "detail": "More changes were missed than a stream replays: reload your orders with GET /orders/my-orders",
        "replays_at_most": RESUME_MAX_CHANGES,
    });
    Event::default()
        .event("reset")
        .id(floor.to_string())
        .data(data.to_string())
}

/// The response of a stream: its events, with heartbeats, ended after `lifetime` when that is bounded (as a stream
/// whose token expires ends: the client reconnects with `Last-Event-ID`).
fn sse(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    lifetime: MaxLifetime,
) -> Response {
    let keep_alive = || KeepAlive::new().interval(HEARTBEAT).text("heartbeat");
    let mut response = match lifetime.0 {
        None => Sse::new(events).keep_alive(keep_alive()).into_response(),
        Some(lifetime) => Sse::new(events.take_until(tokio::time::sleep(lifetime)))
            .keep_alive(keep_alive())
            .into_response(),
    };
    // hyper keeps a response's header map, emptied, for as long as its connection is open (to reuse for the next
    // request), and a stream's connection is open for hours: the map is sized for the headers it carries (these
    // two and `x-request-id`), not for the six that a first insert makes room for. 0.3 KB a stream.
    let mut headers = HeaderMap::with_capacity(SSE_RESPONSE_HEADERS);
    headers.extend(std::mem::take(response.headers_mut()));
    *response.headers_mut() = headers;
    response
}

/// Orders a stream of all of a user's orders remembers (about 40 bytes each) before it forgets the settled ones.
const SENT_MAX: usize = 1024;

/// How long after a change was sent a stream takes every change with a smaller id as committed, and so as sent
/// (live, or read back from the history after a reconnect). No transaction that changes an order's status runs
/// this long: each is one statement, under the pools' statement timeout.
const SETTLED_AFTER: Duration = Duration::from_secs(60);

/// The headers of a stream's response: `content-type`, `cache-control` and `x-request-id`.
const SSE_RESPONSE_HEADERS: usize = 3;

/// The `Last-Event-ID` header: an event id this api sent (a whole number, 0 or more).
pub(crate) fn last_event_id(headers: &HeaderMap) -> ApiResult<Option<i64>> {
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
fn status_event(id: i64, order: &Order) -> Event {
    let data = order_json(order).unwrap_or_default();
    Event::default()
        .event("status")
        .id(id.to_string())
        .data(data)
}

/// What one stream watches, and what it has sent of it.
enum Scope {
    /// One order, until it is COMPLETED or CANCELLED.
    Order {
        order: OrderId,
        /// The last change sent (or skipped as already known).
        cursor: i64,
        /// A final status was queued: the stream ends once it is sent.
        done: bool,
    },
    /// Every order of one user.
    User {
        user: UserId,
        /// Changes up to this id were sent or came before the stream: the history is read after it.
        floor: i64,
        /// The last change sent per order since the floor, so that a change read back from the history is not
        /// sent twice. Emptied up to the floor by each read of the history, and of the settled changes
        /// ([`SETTLED_AFTER`]) once it holds `forget_at` orders.
        sent: HashMap<OrderId, Sent>,
        /// [`SENT_MAX`], or twice what `sent` kept at its last forgetting when more were recent.
        forget_at: usize,
        /// The last read of the history was a full page: the next one follows once the queue is sent.
        more: bool,
    },
}

/// The last change sent of one order, and when.
struct Sent {
    id: i64,
    at: Instant,
}

impl Scope {
    fn user(user: UserId, floor: i64) -> Self {
        Self::User {
            user,
            floor,
            sent: HashMap::new(),
            forget_at: SENT_MAX,
            more: false,
        }
    }

    fn order(order: OrderId, cursor: i64, done: bool) -> Self {
        Self::Order {
            order,
            cursor,
            done,
        }
    }

    /// The event for `change`, unless it was sent already (or the stream is done).
    fn accept(&mut self, change: &StatusChange) -> Option<Event> {
        match self {
            Self::Order { cursor, done, .. } => {
                if change.id <= *cursor || *done {
                    return None;
                }
                *cursor = change.id;
                *done = change.order.status.is_final();
            }
            Self::User {
                floor,
                sent,
                forget_at,
                ..
            } => {
                let order = change.order.id;
                if change.id <= *floor || sent.get(&order).is_some_and(|last| change.id <= last.id)
                {
                    return None;
                }
                // A final change too: the next read of the history, from the floor, gives it again.
                let at = Instant::now();
                sent.insert(order, Sent { id: change.id, at });
                if sent.len() >= *forget_at {
                    forget_settled(floor, sent, at);
                    *forget_at = SENT_MAX.max(2 * sent.len());
                }
            }
        }
        Some(status_event(change.id, &change.order))
    }

    fn done(&self) -> bool {
        matches!(self, Self::Order { done: true, .. })
    }

    /// Whether the history has more for this stream than it read so far.
    fn more(&self) -> bool {
        matches!(self, Self::User { more: true, .. })
    }

    /// Reads what this stream may have missed (a page of it, for a user's stream), once `turns` has a turn free:
    /// held for the query alone, so that streams catching up together never crowd the requests out of the pool.
    fn read_history(
        &self,
        db: &PgPool,
        turns: Arc<Semaphore>,
    ) -> BoxFuture<'static, sqlx::Result<Vec<StatusChange>>> {
        let db = db.clone();
        match *self {
            Self::Order { order, cursor, .. } => async move {
                let _turn = turns.acquire_owned().await;
                events::changes_of_order(&db, order, cursor).await
            }
            .boxed(),
            Self::User { user, floor, .. } => async move {
                let _turn = turns.acquire_owned().await;
                events::changes_of_user(&db, user, floor).await
            }
            .boxed(),
        }
    }
}

/// Moves `floor` up to the last of the changes sent at least [`SETTLED_AFTER`] before `now` (all those before
/// them are committed by then, and were sent live or read back), and forgets what was sent up to it.
fn forget_settled(floor: &mut i64, sent: &mut HashMap<OrderId, Sent>, now: Instant) {
    let settled = sent
        .values()
        .filter(|last| now.duration_since(last.at) >= SETTLED_AFTER)
        .map(|last| last.id)
        .max();
    if let Some(settled) = settled {
        *floor = (*floor).max(settled);
        sent.retain(|_, last| last.id > *floor);
    }
}

/// One open stream: the events to send, from the handler's first reads, its feed and, when told to catch up,
/// the history.
///
/// A plain [`Stream`] with its state in one place: 10,000 of these may be open on one process, and the
/// `async` version (`stream::unfold` over an `async fn`) held its state twice, with a future for each thing it
/// waited on.
struct EventStream {
    feed: Subscription,
    db: PgPool,
    _slot: Slot,
    scope: Scope,
    /// Events ready to send, oldest first.
    queue: VecDeque<Event>,
    /// A read of the history under way.
    reading: Option<BoxFuture<'static, sqlx::Result<Vec<StatusChange>>>>,
}

impl EventStream {
    fn new(feed: Subscription, db: &PgPool, slot: Slot, scope: Scope) -> Self {
        Self {
            feed,
            db: db.clone(),
            _slot: slot,
            scope,
            queue: VecDeque::new(),
            reading: None,
        }
    }

    /// Queues the changes read from the history, and moves the user's floor past them.
    fn caught_up(&mut self, missed: &[StatusChange]) {
        self.queue
            .extend(missed.iter().filter_map(|change| self.scope.accept(change)));
        if let Scope::User {
            floor, sent, more, ..
        } = &mut self.scope
        {
            if let Some(last) = missed.last() {
                *floor = (*floor).max(last.id);
            }
            *more = missed.len() as i64 == events::USER_CHANGES_PAGE;
            // The history is read after the floor from now on: what was sent up to it cannot come again.
            sent.retain(|_, last| last.id > *floor);
            if sent.is_empty() {
                *sent = HashMap::new();
            }
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.queue.pop_front() {
                if this.queue.is_empty() {
                    // A batch from the history is sent: give its room back.
                    this.queue = VecDeque::new();
                }
                return Poll::Ready(Some(Ok(event)));
            }
            if this.scope.done() {
                return Poll::Ready(None);
            }
            if this.reading.is_none() && this.scope.more() {
                // Told to stop: the rest of the history is not worth the wait.
                if this.feed.is_closed() {
                    return Poll::Ready(None);
                }
                this.reading = Some(this.scope.read_history(&this.db, this.feed.history_reads()));
            }
            if let Some(reading) = &mut this.reading {
                let read = ready!(reading.poll_unpin(cx));
                this.reading = None;
                match read {
                    Ok(missed) => this.caught_up(&missed),
                    // The client reconnects with Last-Event-ID and gets them then.
                    Err(err) => {
                        // Outside the request's span (see `startup::in_request_span`): the topic says whose it is.
                        tracing::warn!(error = %err, topic = ?this.feed.topic(), "cannot read missed order events; closing the stream");
                        return Poll::Ready(None);
                    }
                }
                continue;
            }
            match ready!(this.feed.poll_signal(cx)) {
                Signal::Stop => return Poll::Ready(None),
                Signal::CatchUp => {
                    this.reading =
                        Some(this.scope.read_history(&this.db, this.feed.history_reads()));
                }
                Signal::Change(change) => {
                    if let Some(event) = this.scope.accept(&change) {
                        return Poll::Ready(Some(Ok(event)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use orders_core::domain::OrderStatus;

    use super::*;

    /// A final change (COMPLETED): the kind a user's stream used to forget, and send again after a reconnect.
    fn change(id: i64, order: OrderId, user: UserId) -> StatusChange {
        crate::events::tests::change(id, order, user, OrderStatus::Completed)
    }

    fn remembered(scope: &Scope) -> (i64, usize, usize) {
        match scope {
            Scope::User {
                floor,
                sent,
                forget_at,
                ..
            } => (*floor, sent.len(), *forget_at),
            Scope::Order { .. } => panic!("not a user's stream"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_stream_forgets_only_settled_changes_and_never_sends_one_twice() {
        let user = UserId::new();
        let mut scope = Scope::user(user, 0);
        let orders: Vec<OrderId> = (0..SENT_MAX).map(|_| OrderId::new()).collect();
        let (old, recent) = orders.split_at(SENT_MAX / 2);
        // Final changes (COMPLETED): remembered all the same, since a read of the history would give them again.
        for (id, order) in (1..).zip(old) {
            assert!(scope.accept(&change(id, *order, user)).is_some());
        }
        tokio::time::advance(SETTLED_AFTER).await;
        // The recent ones include an id below the settled ones' (a transaction that committed late).
        for (id, order) in (10_000..).zip(recent) {
            let id = if id == 10_000 { 3 } else { id };
            assert!(scope.accept(&change(id, *order, user)).is_some());
        }
        // The last one made SENT_MAX: the settled ones (ids 1 to 512) are forgotten behind the floor, and the one
        // below it with them (its change committed, and was sent).
        let settled = (SENT_MAX / 2) as i64;
        assert_eq!(remembered(&scope), (settled, SENT_MAX / 2 - 1, SENT_MAX));
        // Read back from the history: nothing twice.
        assert!(scope.accept(&change(5, old[4], user)).is_none());
        assert!(scope.accept(&change(3, recent[0], user)).is_none());
        assert!(scope.accept(&change(10_001, recent[1], user)).is_none());
        // A later change of a forgotten order is sent, and so is one that commits late with an id below the
        // recent ones': the floor stopped at what had settled.
        assert!(scope.accept(&change(20_000, old[0], user)).is_some());
        assert!(scope.accept(&change(600, OrderId::new(), user)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_stream_forgets_nothing_recent_and_waits_for_twice_as_many() {
        let user = UserId::new();
        let mut scope = Scope::user(user, 0);
        for id in 1..=SENT_MAX as i64 {
            assert!(scope.accept(&change(id, OrderId::new(), user)).is_some());
        }
        assert_eq!(remembered(&scope), (0, SENT_MAX, 2 * SENT_MAX));
        tokio::time::advance(SETTLED_AFTER).await;
        for id in 1..=SENT_MAX as i64 {
            let id = SENT_MAX as i64 + id;
            assert!(scope.accept(&change(id, OrderId::new(), user)).is_some());
        }
        assert_eq!(
            remembered(&scope),
            (SENT_MAX as i64, SENT_MAX, 2 * SENT_MAX)
        );
    }
}
