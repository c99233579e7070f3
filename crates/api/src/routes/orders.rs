//! Orders: create (idempotent with `Idempotency-Key`), list mine, get one, cancel.

use axum::{
    Extension, Json as JsonResponse,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Datelike, Utc};
use std::time::Duration;
use tokio::time::Instant;

use orders_core::{
    db::{
        KeptConnections,
        batch::{BatchError, Batcher, Gate, Limits},
        orders::{self as db, CancelError, NewOrder, OrderCursor, PageRequest},
    },
    domain::{Amount, Order, OrderId, OrderStatus, ProductName},
    queue::{Admission, OrderQueue},
};
use serde::{Deserialize, Serialize};
use sqlx::{Connection as _, PgPool};
use tracing::Span;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::AuthUser,
    config::RateLimits,
    error::{ApiError, ApiResult, ErrorBody, ValidationErrorBody},
    extract::{Fields, FromFields, IdempotencyKeyHeader, Json, OrderPath, Query},
    loc,
    rate_limit::RouteLimits,
    startup::RequestDeadline,
    state::AppState,
};

/// Routes of this module, each with its own rate limit, in the order people use them: the OpenAPI document and
/// Swagger UI list them so.
pub fn router(limits: &RateLimits, per_route: &RouteLimits) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(per_route.apply(
            OpenApiRouter::new().routes(routes!(create_order)),
            "create_order",
            limits.rate_limit_create_order_per_minute,
        ))
        .merge(per_route.apply(
            OpenApiRouter::new().routes(routes!(list_my_orders)),
            "list_orders",
            limits.rate_limit_list_orders_per_minute,
        ))
        .merge(per_route.apply(
            OpenApiRouter::new().routes(routes!(get_order)),
            "get_order",
            limits.rate_limit_get_order_per_minute,
        ))
        .merge(per_route.apply(
            OpenApiRouter::new().routes(routes!(cancel_order)),
            "cancel_order",
            limits.rate_limit_cancel_order_per_minute,
        ))
}

/// An order, as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderResponse {
    /// The order's id (UUID v7).
    pub id: Uuid,
    /// Its owner.
    pub user_id: Uuid,
    /// What was ordered.
    #[schema(example = "Widget")]
    pub product_name: String,
    /// How much: a number with at most 2 decimal places.
    #[serde(with = "rust_decimal::serde::float")]
    #[schema(value_type = f64, example = 19.99)]
    pub amount: rust_decimal::Decimal,
    /// `PENDING`, `PROCESSING`, `COMPLETED` or `CANCELLED`.
    pub status: OrderStatus,
    /// When it was created.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    /// When its status last changed.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub updated_at: DateTime<Utc>,
}

impl From<Order> for OrderResponse {
    fn from(order: Order) -> Self {
        Self {
            id: order.id.0,
            user_id: order.user_id.0,
            product_name: order.product_name,
            amount: order.amount,
            status: order.status,
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

/// A new order.
#[derive(Debug, ToSchema)]
pub struct CreateOrderRequest {
    /// 1–200 characters after trimming the whitespace around it; no control characters (U+0000–U+001F,
    /// U+007F–U+009F) inside.
    // The pattern is exactly what `ProductName::parse` accepts: see `RegisterRequest::name`. No maxLength: the
    // whitespace around the name does not count.
    #[schema(
        example = "Widget",
        min_length = 1,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000](?:[^\u0000-\u001F\u007F-\u009F]{0,198}[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000])?[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$"
    )]
    #[schema(value_type = String)]
    product_name: ProductName,
    /// A JSON number > 0 and ≤ 1,000,000,000 with at most 2 decimal places, read exactly as written (never
    /// rounded through a double) and stored exactly.
    #[schema(
        value_type = f64,
        example = 19.99,
        exclusive_minimum = 0,
        maximum = 1_000_000_000,
        multiple_of = 0.01
    )]
    amount: Amount,
}

impl FromFields for CreateOrderRequest {
    fn from_fields(fields: &mut Fields) -> Option<Self> {
        let product_name = fields
            .take::<String>("product_name")
            .and_then(|name| fields.check("product_name", ProductName::parse(&name)));
        let amount = fields
            .take_raw("amount")
            .and_then(|raw| fields.check("amount", Amount::parse_json_number(raw.get())));
        Some(Self {
            product_name: product_name?,
            amount: amount?,
        })
    }
}

/// Creates a PENDING order and queues it for processing.
///
/// With an Idempotency-Key header, a repeat of the same request returns the first order (200) instead of
/// creating another; the same key with another body is refused (409). Send one: it makes a retry after a
/// lost connection safe, where a retry without it may create a second order. A 503 means that the order was
/// not created, then or later: retry after Retry-After.
#[utoipa::path(post, path = "/orders/create", tag = "orders", security(("bearer" = [])),
    request_body = CreateOrderRequest,
    params(IdempotencyKeyParam),
    responses(
        (status = 201, body = OrderResponse, description = "Order created"),
        (status = 200, body = OrderResponse, description = "A repeat of an earlier request with the same Idempotency-Key: the first order"),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 409, body = ErrorBody, description = "Idempotency-Key was used with a different request", example = json!({"detail": "Idempotency-Key was used with a different request"})),
        (status = 413, body = ErrorBody, description = "Request body larger than 64 KiB"), (status = 415, body = ErrorBody, description = "Content-Type is not application/json"),
        (status = 422, body = ValidationErrorBody, description = "Invalid input: one entry per problem", example = json!({"detail": [{"loc": ["body", "product_name"], "msg": "String should have at least 1 character after trimming", "type": "string_too_short"}, {"loc": ["body", "amount"], "msg": "Input should be greater than 0", "type": "greater_than"}]})),
        (status = 429, body = ErrorBody, description = "Rate limit exceeded (20/min)", headers(("Retry-After" = u64))),
        (status = 503, body = ErrorBody, description = "Not created: PostgreSQL unavailable or too slow, or too many creates waiting", headers(("Retry-After" = u64))),
    ))]
async fn create_order(
    State(state): State<AppState>,
    request_deadline: Option<Extension<RequestDeadline>>,
    user: AuthUser,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    Json(body): Json<CreateOrderRequest>,
) -> ApiResult<Response> {
    let CreateOrderRequest {
        product_name,
        amount,
    } = body;
    // Whether the job goes to Redis is decided before the insert, so that the insert records it: one commit per
    // create. A queue that cannot be read defers the order to the reconciler.
    let admission = match state.queue.admit(state.enqueue_timeout).await {
        Ok(admission) => admission,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the queue's room; the reconciler will queue the order");
            Admission::Deferred
        }
    };
    // The insert runs in the create batcher's task, and commits only while this request still waits: until the
    // deadline below, or until a client that hangs up drops this future. What the deadline leaves of the request
    // time covers the commit and the push, so that a create that committed is answered 201 before the request
    // timeout, and one answered 503 was never inserted (see `Batcher::run_until`).
    let deadline = request_deadline
        .map_or_else(
            || Instant::now() + REQUEST_TIME_WITHOUT_TIMEOUT,
            |Extension(RequestDeadline(at))| at,
        )
        .checked_sub(state.enqueue_timeout + COMMIT_MARGIN)
        .unwrap_or_else(Instant::now);
    let new = NewOrder::new(
        user.user_id,
        product_name.clone(),
        amount,
        key.clone(),
        admission == Admission::Pushed,
    );
    // The batch logs "order created" in the request's span, so the line carries the request id.
    let order = state
        .creates
        .run_until((new, tracing::Span::current()), deadline)
        .await
        .map_err(|err| match err {
            BatchError::Database(db)
                if orders_core::db::is_constraint_violation(&db, "orders_user_id_fkey") =>
            {
                ApiError::Unauthorized(USER_GONE)
            }
            err => err.into(),
        })?;
    let Some(order) = order else {
        // The key was used before (or by a concurrent request that won the race).
        let key = key
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("insert skipped without an idempotency key"))?;
        let first = db::find_by_idempotency_key(&state.db, user.user_id, key)
            .await?
            .ok_or_else(|| anyhow::anyhow!("idempotency conflict but no order holds the key"))?;
        if !db::same_request(&first, &product_name, amount) {
            return Err(ApiError::Conflict(
                "Idempotency-Key was used with a different request",
            ));
        }
        return Ok((StatusCode::OK, JsonResponse(OrderResponse::from(first))).into_response());
    };
    Ok((
        StatusCode::CREATED,
        JsonResponse(OrderResponse::from(order)),
    )
        .into_response())
}

/// Most orders one statement inserts.
const MAX_CREATE_BATCH: usize = 64;

/// What a create keeps of its request time after its insert's deadline, besides the push (`ENQUEUE_TIMEOUT_MS`):
/// the commit, and the answer.
const COMMIT_MARGIN: Duration = Duration::from_millis(500);

/// The request time of a create served without the request timeout's deadline (a router without that layer).
const REQUEST_TIME_WITHOUT_TIMEOUT: Duration = Duration::from_millis(4500);

/// Group commit for creates: the orders of concurrent requests are inserted with one statement and one commit,
/// then the jobs of those admitted to the queue are pushed in one round trip. A lone request is not delayed: a
/// batch is whatever waits when one of `slots` statement slots is free. A batch that fails is retried order by
/// order, so that a bad row (a deleted user) fails only its own request.
///
/// At most `max_waiting` creates wait for a slot; one more is refused at once (503, nothing written). A create
/// is committed only while its request still waits: the insert runs in a transaction whose statement timeout is
/// the batch's deadline (at most `statement_timeout`), and the gate refuses the commit, and the batch is run
/// again without it, if a request gave up meanwhile (see `db::batch`).
///
/// Once the insert has committed nothing fails: a failed push forgets `enqueued_at` (in the background,
/// bounded), and the reconciler queues those orders.
pub fn create_batcher(
    db: PgPool,
    queue: OrderQueue,
    enqueue_timeout: Duration,
    statement_timeout: Duration,
    slots: usize,
    max_waiting: usize,
) -> Batcher<(NewOrder, Span), Option<Order>> {
    let limits = Limits {
        max_waiting,
        ..Limits::new(MAX_CREATE_BATCH, slots)
    };
    Batcher::spawn(limits, move |batch: Vec<(NewOrder, Span)>, gate: Gate| {
        let (db, queue) = (db.clone(), queue.clone());
        async move {
            let (orders, spans): (Vec<NewOrder>, Vec<Span>) = batch.into_iter().unzip();
            let mut conn = gate.acquire(&db).await?;
            let mut tx = conn
                .begin_with(gate.begin_until_deadline(statement_timeout))
                .await?;
            let inserted = db::insert_orders(&mut *tx, &orders).await?;
            if !gate.take_all() {
                // A request gave up while the insert ran: nothing is committed, and the batcher runs the
                // insert again for the others.
                tx.rollback().await?;
                return Ok(Vec::new());
            }
            tx.commit().await?;
            drop(conn);
            let mut pushed = Vec::with_capacity(orders.len());
            for ((new, span), order) in orders.iter().zip(&spans).zip(&inserted) {
                let Some(order) = order else { continue };
                metrics::counter!("orders_created_total").increment(1);
                span.in_scope(|| tracing::info!(order_id = %order.id, user_id = %order.user_id, "order created"));
                if new.enqueued {
                    pushed.push(order.id);
                } else {
                    metrics::counter!("orders_deferred_total").increment(1);
                    tracing::debug!(order_id = %order.id, "queue full or backlog waiting: the reconciler will queue the order");
                }
            }
            if let Err(err) = queue.push_orders(&pushed, enqueue_timeout).await {
                tracing::warn!(orders = pushed.len(), error = %err, "could not queue new orders; the reconciler will");
                tokio::spawn(async move {
                    // Without this the reconciler still re-pushes them, RECONCILE_REDELIVER_AFTER_MS later.
                    if let Err(err) = db::clear_enqueued(&db, &pushed).await {
                        tracing::debug!(error = %err, "cannot clear enqueued_at; the orders are re-pushed by age");
                    }
                });
            }
            Ok(inserted)
        }
    })
}

/// Most pages one statement reads.
const MAX_PAGE_BATCH: usize = 32;

/// Reads the pages of concurrent "my orders" requests with one statement (one per kind: with and without a
/// status): one round trip and one pooled connection for many requests. A lone request is not delayed. Busy
/// connections stay with the batcher between its statements (see [`KeptConnections`]).
///
/// At most `max_waiting` requests wait for a slot; one more is answered 503 at once. A request that gave up
/// (timed out, or its client hung up) before its batch formed is not read.
pub fn page_batcher(
    db: PgPool,
    slots: usize,
    max_waiting: usize,
) -> Batcher<PageRequest, Vec<Order>> {
    let connections = KeptConnections::new(db);
    let limits = Limits {
        max_waiting,
        ..Limits::new(MAX_PAGE_BATCH, slots)
    };
    Batcher::spawn(limits, move |batch: Vec<PageRequest>, _gate: Gate| {
        let connections = connections.clone();
        async move {
            let mut conn = connections.take().await?;
            let pages = db::list_pages(&mut conn, &batch).await?;
            connections.give_back(conn);
            Ok(pages)
        }
    })
}

const USER_GONE: &str = "User no longer exists";

/// A valid access token may outlive its user (deleted since). Checked only where an answer would otherwise be
/// empty or 404, so the common path costs no extra query: such a token gets 401, as on `/auth/me`.
async fn ensure_user_exists(state: &AppState, user: AuthUser) -> ApiResult<()> {
    match orders_core::db::users::find_user(&state.db, user.user_id).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::Unauthorized(USER_GONE)),
    }
}

/// The optional `Idempotency-Key` header, for the OpenAPI document.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // only describes the header; `IdempotencyKeyHeader` reads it
struct IdempotencyKeyParam {
    /// 1–255 visible ASCII characters, unique per order (a UUID does); a repeat of the same request with it
    /// returns the first order. Swagger UI suggests a fresh one at each page load.
    #[param(
        rename = "Idempotency-Key",
        example = "3f8e2b6c-0d1a-4c5e-9b7f-2a6d8c4e1f00",
        required = false,
        min_length = 1,
        max_length = 255,
        pattern = r"^[!-~]{1,255}$"
    )]
    idempotency_key: String,
}

/// Default page size.
pub(crate) const DEFAULT_LIMIT: i64 = 50;
/// Largest page size.
pub(crate) const MAX_LIMIT: i64 = 100;

/// Filters and paging of "my orders".
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only orders with this status.
    status: Option<OrderStatus>,
    /// Page size, 1–100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// Where the previous page ended: copy it from that page's `Link: <…>; rel="next"` header.
    // An opaque token to clients, but the schema says which ones `decode_cursor` accepts: URL-safe base64 without
    // padding of `<16-digit micros>.<hyphenated lower-case UUID>` (every cursor issued for a time between 2001
    // and 2286). Each group of 4 characters encodes 3 bytes of that layout, so the pattern lists, group by group,
    // the encodings of the bytes allowed there; the first group leaves out `MD`, a leading `0`. decode_cursor
    // accepts exactly the text encode_cursor writes, so this is all it accepts (for those years).
    #[param(
        min_length = 71,
        max_length = 71,
        pattern = r"^(?:O[DT]|M[Tjz]|N[DTjz])[AEIMQUYcgk][w-z0-5](?:(?:O[DT]|[MN][DTjz])[AEIMQUYcgk][w-z0-5]){4}(?:O[CS]|[MN][CSiy])(?:4[w-z0-5]|5[h-m])(?:(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))){2}(?:O[CS]|Y[Siy]|Z[CSi]|[MN][CSiy])(?:0[w-z0-5]|1[h-m])(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))L(?:T(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|W(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])[AEIMQUYcgk]|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])[EIMQUY])t(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))(?:O[CS]|Y[Siy]|Z[CSi]|[MN][CSiy])(?:0[w-z0-5]|1[h-m])(?:(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))){3}(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])[AEIMQUYcgk]|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])[EIMQUY])$"
    )]
    cursor: Option<String>,
}

/// The text of a cursor, as `Link` headers carry it (also the admin search's).
pub(crate) fn encode_cursor(cursor: OrderCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}.{}",
        cursor.created_at.timestamp_micros(),
        cursor.id
    ))
}

/// A cursor from its text; `None` for anything but the exact text [`encode_cursor`] writes.
pub(crate) fn decode_cursor(raw: &str) -> Option<OrderCursor> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw).ok()?).ok()?;
    let (micros, id) = text.split_once('.')?;
    let created_at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    // Every cursor we issue is a real creation time; far-off years would only make PostgreSQL refuse the query.
    if !(1..=9999).contains(&created_at.year()) {
        return None;
    }
    let cursor = OrderCursor {
        created_at,
        id: OrderId(Uuid::parse_str(id).ok()?),
    };
    // Only the exact text we issue, so that the schema's pattern states precisely what is accepted (no signs,
    // leading zeros or other spellings of the same uuid).
    (encode_cursor(cursor) == raw).then_some(cursor)
}

/// My orders, newest first.
///
/// Filter with status; page with limit (1-100, default 50). When more orders exist, the Link header
/// (rel="next") holds the URL of the next page.
#[utoipa::path(get, path = "/orders/my-orders", tag = "orders", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, body = Vec<OrderResponse>, description = "My orders, newest first", headers(("Link" = String, description = "`</orders/my-orders?...&cursor=...>; rel=\"next\"` when more orders exist"))),
    (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 422, body = ValidationErrorBody, description = "Bad status, limit or cursor", example = json!({"detail": [{"loc": ["query", "status"], "msg": "Input should be 'PENDING', 'PROCESSING', 'COMPLETED' or 'CANCELLED'", "type": "enum"}]})),
    (status = 429, body = ErrorBody, description = "Rate limit exceeded (30/min)", headers(("Retry-After" = u64))),
    (status = 503, body = ErrorBody, description = "PostgreSQL unavailable or too slow, or too many reads waiting", headers(("Retry-After" = u64))),
))]
async fn list_my_orders(
    State(state): State<AppState>,
    user: AuthUser,
    Query(query): Query<ListQuery>,
) -> ApiResult<Response> {
    let limit = page_limit(query.limit)?;
    let cursor = page_cursor(query.cursor.as_deref())?;
    // One extra row tells whether a next page exists.
    let request = PageRequest {
        user_id: user.user_id,
        status: query.status,
        cursor,
        limit: limit + 1,
    };
    let mut orders = state.pages.run(request).await?;
    if orders.is_empty() {
        ensure_user_exists(&state, user).await?;
    }
    let next = next_page(&mut orders, limit).map(OrderCursor::from);
    let mut response = json_list(&orders);
    if let Some(next) = next {
        let status = query
            .status
            .map(|s| format!("&status={}", s.as_str()))
            .unwrap_or_default();
        let link = format!(
            "/orders/my-orders?limit={limit}{status}&cursor={}",
            encode_cursor(next)
        );
        link_next(&mut response, &link);
    }
    Ok(response)
}

/// The page size asked for (`?limit=`, 1–100, default 50), or a 422.
pub(crate) fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if limit < 1 {
        return Err(ApiError::field(
            loc!["query", "limit"],
            "greater_than_equal",
            "Input should be greater than or equal to 1",
        ));
    }
    if limit > MAX_LIMIT {
        return Err(ApiError::field(
            loc!["query", "limit"],
            "less_than_equal",
            "Input should be less than or equal to 100",
        ));
    }
    Ok(limit)
}

/// The `?cursor=` of a listing of orders, decoded, or a 422.
pub(crate) fn page_cursor(raw: Option<&str>) -> ApiResult<Option<OrderCursor>> {
    raw.map(|raw| {
        decode_cursor(raw).ok_or_else(|| {
            ApiError::field(
                loc!["query", "cursor"],
                "value_error",
                "Invalid cursor: use the one from a Link header",
            )
        })
    })
    .transpose()
}

/// Cuts `rows`, read with one more than `limit`, to `limit`: the last row kept when more follow (where the next page
/// starts), `None` on the last page.
pub(crate) fn next_page<T>(rows: &mut Vec<T>, limit: i64) -> Option<&T> {
    if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last()
    } else {
        None
    }
}

/// Adds `Link: <link>; rel="next"` to `response`.
pub(crate) fn link_next(response: &mut Response, link: &str) {
    if let Ok(value) = HeaderValue::from_str(&format!("<{link}>; rel=\"next\"")) {
        response.headers_mut().insert(header::LINK, value);
    }
}

/// A list of orders as a JSON response: the bytes `serde_json` would write for `[OrderResponse]`, written
/// directly into a buffer sized up front (an order takes about 250 bytes). Through serde, every uuid and timestamp
/// was formatted into a string of its own and then scanned for characters to escape, which have none: about a
/// tenth of the api's CPU on pages of 50. `json_list_matches_serde` pins the output to serde's, byte for byte.
fn json_list(orders: &[Order]) -> Response {
    let mut body = Vec::with_capacity(orders.len() * 256 + 2);
    body.push(b'[');
    for (at, order) in orders.iter().enumerate() {
        if at > 0 {
            body.push(b',');
        }
        if let Err(err) = write_order(&mut body, order) {
            return ApiError::Internal(err.into()).into_response();
        }
    }
    body.push(b']');
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// One order as JSON text, the bytes `OrderResponse` serializes to (for an event's `data:`).
pub(crate) fn order_json(order: &Order) -> serde_json::Result<String> {
    let mut out = Vec::with_capacity(256);
    write_order(&mut out, order)?;
    // Only ASCII punctuation and serde_json's own output were written: valid UTF-8.
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// One order as `OrderResponse` serializes it (same fields, same order, same text).
fn write_order(out: &mut Vec<u8>, order: &Order) -> serde_json::Result<()> {
    let mut uuid = Uuid::encode_buffer();
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(order.id.0.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.extend_from_slice(b"\",\"user_id\":\"");
    out.extend_from_slice(
        order
            .user_id
            .0
            .hyphenated()
            .encode_lower(&mut uuid)
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"product_name\":");
    // The only field a client chose: escaped by serde_json.
    serde_json::to_writer(&mut *out, &order.product_name)?;
    out.extend_from_slice(b",\"amount\":");
    rust_decimal::serde::float::serialize(
        &order.amount,
        &mut serde_json::Serializer::new(&mut *out),
    )?;
    out.extend_from_slice(b",\"status\":\"");
    out.extend_from_slice(order.status.as_str().as_bytes());
    out.extend_from_slice(b"\",\"created_at\":\"");
    crate::timestamp::write(out, order.created_at);
    out.extend_from_slice(b"\",\"updated_at\":\"");
    crate::timestamp::write(out, order.updated_at);
    out.extend_from_slice(b"\"}");
    Ok(())
}

/// One of my orders.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, body = OrderResponse, description = "The order"),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 404, body = ErrorBody, description = "No such order of yours", example = json!({"detail": "Order not found"})),
        (status = 422, body = ValidationErrorBody, description = "Malformed id", example = json!({"detail": [{"loc": ["path", "id"], "msg": "Input should be a valid UUID, invalid character: found `n` at 0", "type": "uuid_parsing"}]})),
        (status = 429, body = ErrorBody, description = "Rate limit exceeded (60/min)", headers(("Retry-After" = u64))),
        (status = 503, body = ErrorBody, description = "PostgreSQL or Redis unavailable"),
    ))]
async fn get_order(
    State(state): State<AppState>,
    user: AuthUser,
    OrderPath(id): OrderPath,
) -> ApiResult<JsonResponse<OrderResponse>> {
    match db::find_order(&state.db, user.user_id, id).await? {
        Some(order) => Ok(JsonResponse(order.into())),
        None => {
            ensure_user_exists(&state, user).await?;
            Err(ApiError::NotFound("Order not found"))
        }
    }
}

/// Cancels one of my orders while it is still PENDING.
#[utoipa::path(patch, path = "/orders/{id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, body = OrderResponse, description = "Cancelled", example = json!({"id": "01a2490a-4290-7584-864f-f4f11ccd2288", "user_id": "01a2490a-3199-72ac-be9d-2b67ed4b65c0", "product_name": "Widget", "amount": 19.99, "status": "CANCELLED", "created_at": "2026-12-06T01:48:58.897066Z", "updated_at": "2026-12-06T01:48:58.941241Z"})),
        (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 404, body = ErrorBody, description = "No such order of yours", example = json!({"detail": "Order not found"})),
        (status = 409, body = ErrorBody, description = "Only pending orders can be cancelled", example = json!({"detail": "Only pending orders can be cancelled"})),
        (status = 422, body = ValidationErrorBody, description = "Malformed id", example = json!({"detail": [{"loc": ["path", "id"], "msg": "Input should be a valid UUID, invalid character: found `n` at 0", "type": "uuid_parsing"}]})),
        (status = 429, body = ErrorBody, description = "Rate limit exceeded (10/min)", headers(("Retry-After" = u64))),
        (status = 503, body = ErrorBody, description = "PostgreSQL or Redis unavailable"),
    ))]
async fn cancel_order(
    State(state): State<AppState>,
    user: AuthUser,
    OrderPath(id): OrderPath,
) -> ApiResult<JsonResponse<OrderResponse>> {
    match db::cancel_order(&state.db, user.user_id, id).await {
        Ok(order) => {
            tracing::info!(order_id = %order.id, "order cancelled");
            Ok(JsonResponse(order.into()))
        }
        Err(CancelError::NotFound) => {
            ensure_user_exists(&state, user).await?;
            Err(ApiError::NotFound("Order not found"))
        }
        Err(CancelError::NotPending) => {
            Err(ApiError::Conflict("Only pending orders can be cancelled"))
        }
        Err(CancelError::Database(err)) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_list_matches_serde() {
        let at = |micros: i64| DateTime::from_timestamp_micros(micros).unwrap();
        let order = |name: &str, cents: i64, status, created: i64, updated: i64| Order {
            id: OrderId::new(),
            user_id: orders_core::domain::UserId(Uuid::now_v7()),
            product_name: name.to_owned(),
            amount: rust_decimal::Decimal::new(cents, 2),
            status,
            created_at: at(created),
            updated_at: at(updated),
        };
        let orders = [
            order(
                "Widget",
                1999,
                OrderStatus::Pending,
                1_764_000_000_123_456,
                1_764_000_000_123_456,
            ),
            order(
                "\"quoted\" \\ back\tslash",
                100,
                OrderStatus::Processing,
                1_764_000_000_000_000,
                1_764_000_001_120_000,
            ),
            order(
                "émoji 🎉 and \u{2028}",
                99_999_999_999,
                OrderStatus::Completed,
                0,
                1,
            ),
            order(
                "Ω",
                2000,
                OrderStatus::Cancelled,
                1_764_000_000_500_000,
                1_764_000_002_000_001,
            ),
            order(
                "1",
                1,
                OrderStatus::Pending,
                -1_000_000,
                253_402_300_799_999_999,
            ),
        ];
        for page in [&orders[..0], &orders[..1], &orders[..]] {
            let response = json_list(page);
            let body = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
                response.into_body(),
                usize::MAX,
            ))
            .unwrap()
            .unwrap();
            let expected = serde_json::to_vec(
                &page
                    .iter()
                    .cloned()
                    .map(OrderResponse::from)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            assert_eq!(
                String::from_utf8(body.to_vec()).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = OrderCursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: OrderId::new(),
        };
        assert_eq!(decode_cursor(&encode_cursor(cursor)), Some(cursor));
        let far_past = URL_SAFE_NO_PAD.encode(format!("-8000000000000000000.{}", OrderId::new()));
        let far_future = URL_SAFE_NO_PAD.encode(format!("8000000000000000000.{}", OrderId::new()));
        assert_eq!(decode_cursor(&far_past), None);
        // Other spellings of the same cursor are refused: only the exact text issued is accepted.
        let id = cursor.id.to_string();
        for other in [
            format!("0{}.{id}", cursor.created_at.timestamp_micros()),
            format!("+{}.{id}", cursor.created_at.timestamp_micros()),
            format!(
                "{}.{}",
                cursor.created_at.timestamp_micros(),
                id.to_uppercase()
            ),
            format!(
                "{}.{}",
                cursor.created_at.timestamp_micros(),
                id.replace('-', "")
            ),
        ] {
            assert_eq!(
                decode_cursor(&URL_SAFE_NO_PAD.encode(&other)),
                None,
                "{other}"
            );
        }
        assert_eq!(decode_cursor(&far_future), None);
        for garbage in [
            "",
            "abc",
            "!!!",
            &URL_SAFE_NO_PAD.encode("1.notauuid"),
            &URL_SAFE_NO_PAD.encode("x.y"),
        ] {
            assert_eq!(decode_cursor(garbage), None, "{garbage:?}");
        }
    }
}
