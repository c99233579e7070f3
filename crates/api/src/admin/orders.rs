//! The admin API's orders: the search, one order with its timeline, and the operator's actions on them (re-drive,
//! cancel), each written to the audit log in the action's own transaction.

use std::collections::HashSet;

use axum::{
    Extension, Json as JsonResponse,
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Datelike, Utc};
use orders_core::{
    db::{
        admin::{self as db, FoundOrder, NewAuditEntry, OrderFilter},
        orders::{self as orders_db, OrderCursor},
    },
    domain::{Email, OrderId, OrderStatus},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{
    ROLE_RECHECK,
    access::{AdminUser, Operator, role_lost},
};
use crate::{
    error::{ApiError, ApiResult, FieldError},
    events::{MaxLifetime, authority::Authority},
    extract::{Fields, FromFields, Json, OrderPath, Query},
    loc,
    routes::{
        events::{OrderReader, last_event_id, order_stream},
        orders::{OrderResponse, encode_cursor, link_next, next_page, page_cursor, page_limit},
    },
    state::AppState,
};

/// Most orders one action may name or match.
pub const MAX_ACTION_ORDERS: usize = 1000;

/// The search's filters, as query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// One order by id.
    id: Option<Uuid>,
    /// The orders of the user with this email (exact, case-insensitive).
    #[param(example = "ada@example.com", format = Email, max_length = 254)]
    email: Option<String>,
    /// Only orders with this status.
    status: Option<OrderStatus>,
    /// `true`: only parked orders (their attempts ran out); `false`: only orders not parked.
    parked: Option<bool>,
    /// Orders whose product name starts with this (case-sensitive), 1–200 characters.
    #[param(
        example = "Wid",
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]{1,200}$"
    )]
    product: Option<String>,
    /// Orders created at or after this time (RFC 3339).
    created_from: Option<DateTime<Utc>>,
    /// Orders created before this time (RFC 3339); before `created_from`, nothing matches.
    created_to: Option<DateTime<Utc>>,
}

/// A page of the search's results, as query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1–100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// Where the previous page ended: copy it from that page's `Link: <…>; rel="next"` header.
    // The same cursors as `GET /orders/my-orders` issues and accepts (see `routes::orders::ListQuery`), so the
    // same pattern, which states exactly which ones.
    #[param(
        min_length = 71,
        max_length = 71,
        pattern = r"^(?:O[DT]|M[Tjz]|N[DTjz])[AEIMQUYcgk][w-z0-5](?:(?:O[DT]|[MN][DTjz])[AEIMQUYcgk][w-z0-5]){4}(?:O[CS]|[MN][CSiy])(?:4[w-z0-5]|5[h-m])(?:(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))){2}(?:O[CS]|Y[Siy]|Z[CSi]|[MN][CSiy])(?:0[w-z0-5]|1[h-m])(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))L(?:T(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|W(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])[AEIMQUYcgk]|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])[EIMQUY])t(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))(?:O[CS]|Y[Siy]|Z[CSi]|[MN][CSiy])(?:0[w-z0-5]|1[h-m])(?:(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])(?:[AEIMQUYcgk][w-z0-5]|[BFJNRVZdhl][h-m])|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])(?:[EIMQUY][w-z0-5]|[FJNRVZ][h-m]))){3}(?:(?:O[DT]|Y[Tjz]|Z[DTj]|[MN][DTjz])[AEIMQUYcgk]|(?:O[GW]|Y[Wm2]|Z[GWm]|[MN][GWm2])[EIMQUY])$"
    )]
    cursor: Option<String>,
}

/// The filters of a search, as the body of an action carries them (`{"search": {...}}`).
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchFilters {
    /// One order by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// The orders of the user with this email (exact, case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "ada@example.com", format = Email, max_length = 254)]
    pub email: Option<String>,
    /// Only orders with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<OrderStatus>,
    /// `true`: only parked orders; `false`: only orders not parked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<bool>,
    /// Orders whose product name starts with this (case-sensitive), 1–200 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        example = "Wid",
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]{1,200}$"
    )]
    pub product: Option<String>,
    /// Orders created at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_from: Option<DateTime<Utc>>,
    /// Orders created before this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_to: Option<DateTime<Utc>>,
}

impl SearchQuery {
    fn filters(&self) -> SearchFilters {
        SearchFilters {
            id: self.id,
            email: self.email.clone(),
            status: self.status,
            parked: self.parked,
            product: self.product.clone(),
            created_from: self.created_from,
            created_to: self.created_to,
        }
    }
}

impl SearchFilters {
    /// The filter for the database, or a 422 naming each bad value under `root` (`["query"]` or
    /// `["body", "search"]`).
    fn parse(&self, root: &[&str]) -> ApiResult<OrderFilter> {
        let at_field = |field: &str| {
            let mut loc: Vec<Value> = root.iter().map(|part| Value::from(*part)).collect();
            loc.push(Value::from(field));
            loc
        };
        let mut errors = Vec::new();
        let email = match self.email.as_deref().map(Email::parse) {
            None => None,
            Some(Ok(email)) => Some(email),
            Some(Err(invalid)) => {
                errors.push(FieldError::invalid(at_field("email"), invalid));
                None
            }
        };
        if let Some(product) = &self.product {
            let len = product.chars().count();
            if len == 0 || len > 200 || product.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    at_field("product"),
                    "string_pattern_mismatch",
                    "A product-name prefix has 1–200 characters and no control characters",
                ));
            }
        }
        // PostgreSQL refuses times far outside these years, which chrono reads.
        for (field, at) in [
            ("created_from", self.created_from),
            ("created_to", self.created_to),
        ] {
            if at.is_some_and(|at| !(1..=9999).contains(&at.year())) {
                errors.push(FieldError::new(
                    at_field(field),
                    "datetime_from_date_parsing",
                    "Input should be a time between the years 1 and 9999",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        Ok(OrderFilter {
            id: self.id.map(OrderId),
            email,
            status: self.status,
            parked: self.parked,
            product_prefix: self.product.clone(),
            created_from: self.created_from,
            created_to: self.created_to,
        })
    }
}

/// An order in the search's results: the order, with its owner's email, attempts and parking.
#[derive(Debug, Serialize, ToSchema)]
pub struct FoundOrderResponse {
    /// The order.
    #[serde(flatten)]
    pub order: OrderResponse,
    /// Its owner's email.
    #[schema(example = "ada@example.com")]
    pub user_email: String,
    /// Attempts the worker has made.
    pub attempts: i32,
    /// When it was parked (its attempts ran out), while it is.
    #[serde(serialize_with = "crate::timestamp::serialize_option")]
    pub parked_at: Option<DateTime<Utc>>,
}

impl From<FoundOrder> for FoundOrderResponse {
    fn from(found: FoundOrder) -> Self {
        Self {
            order: found.order.into(),
            user_email: found.user_email,
            attempts: found.attempts,
            parked_at: found.parked_at,
        }
    }
}

/// Searches every order, newest first.
///
/// Filter by `id`, `email` (the owner's, exact and case-insensitive), `status`, `parked`, `product` (a
/// product-name prefix) and a creation-time range (`created_from` inclusive, `created_to` exclusive); the filters
/// given all apply. Page with `limit` (1–100, default 50): when more orders match, the `Link` header (rel="next")
/// holds the URL of the next page.
#[utoipa::path(get, path = "/admin/orders", tag = "admin", security(("bearer" = [])), params(SearchQuery, PageQuery), responses(
    (status = 200, body = Vec<FoundOrderResponse>, description = "Matching orders, newest first", headers(("Link" = String, description = "`</admin/orders?...&cursor=...>; rel=\"next\"` when more orders match"))),
    (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
    (status = 422, body = crate::error::ValidationErrorBody, description = "Bad filter, limit or cursor", example = json!({"detail": [{"loc": ["query", "status"], "msg": "Input should be 'PENDING', 'PROCESSING', 'COMPLETED' or 'CANCELLED'", "type": "enum"}]})),
    (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
    (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable or too slow", headers(("Retry-After" = u64))),
))]
pub(super) async fn search_orders(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<SearchQuery>,
    Query(page): Query<PageQuery>,
) -> ApiResult<Response> {
    let limit = page_limit(page.limit)?;
    let filters = query.filters();
    let filter = filters.parse(&["query"])?;
    let cursor = page_cursor(page.cursor.as_deref())?;
    let mut conn = state.db.acquire().await?;
    let mut found = db::search_orders(&mut conn, &filter, cursor, limit + 1).await?;
    drop(conn);
    let next = next_page(&mut found, limit).map(OrderCursor::from);
    let page: Vec<FoundOrderResponse> = found.into_iter().map(Into::into).collect();
    let mut response = JsonResponse(page).into_response();
    if let Some(next) = next {
        link_next(&mut response, &search_link(&filters, limit, next));
    }
    Ok(response)
}

/// The URL of the page after `next` of the same search.
fn search_link(filters: &SearchFilters, limit: i64, next: OrderCursor) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(id) = filters.id {
        query.append_pair("id", &id.to_string());
    }
    if let Some(email) = &filters.email {
        query.append_pair("email", email);
    }
    if let Some(status) = filters.status {
        query.append_pair("status", status.as_str());
    }
    if let Some(parked) = filters.parked {
        query.append_pair("parked", if parked { "true" } else { "false" });
    }
    if let Some(product) = &filters.product {
        query.append_pair("product", product);
    }
    if let Some(from) = filters.created_from {
        query.append_pair("created_from", &from.to_rfc3339());
    }
    if let Some(to) = filters.created_to {
        query.append_pair("created_to", &to.to_rfc3339());
    }
    query.append_pair("limit", &limit.to_string());
    query.append_pair("cursor", &encode_cursor(next));
    format!("/admin/orders?{}", query.finish())
}

/// Most orders a count counts.
pub const MAX_COUNT: i64 = 10_000;

/// How many orders a search matches.
#[derive(Debug, Serialize, ToSchema)]
pub struct CountResponse {
    /// Orders matching, counted up to 10,000.
    #[schema(example = 37)]
    pub count: i64,
    /// Whether more orders match than `count` (the count stopped at 10,000).
    pub more: bool,
}

/// Counts the orders a search matches, up to 10,000: what a re-drive of that search would name (at most 1,000).
///
/// Takes the filters of `GET /admin/orders`.
#[utoipa::path(get, path = "/admin/orders/count", tag = "admin", security(("bearer" = [])), params(SearchQuery), responses(
    (status = 200, body = CountResponse, description = "How many orders match", example = json!({"count": 37, "more": false})),
    (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
    (status = 422, body = crate::error::ValidationErrorBody, description = "Bad filter", example = json!({"detail": [{"loc": ["query", "status"], "msg": "Input should be 'PENDING', 'PROCESSING', 'COMPLETED' or 'CANCELLED'", "type": "enum"}]})),
    (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
    (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable or too slow", headers(("Retry-After" = u64))),
))]
pub(super) async fn count_orders(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<SearchQuery>,
) -> ApiResult<JsonResponse<CountResponse>> {
    let filter = query.filters().parse(&["query"])?;
    let mut conn = state.db.acquire().await?;
    let count = db::count_orders(&mut conn, &filter, MAX_COUNT + 1).await?;
    Ok(JsonResponse(CountResponse {
        count: count.min(MAX_COUNT),
        more: count > MAX_COUNT,
    }))
}

/// One status change on an order's timeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineEntry {
    /// The change's id (the `id` of the order's live stream events).
    pub id: i64,
    /// The status it moved to.
    pub status: OrderStatus,
    /// Who made it: a worker's claim token (`worker-…/…`), `operator:<email>`, or `null` (the owner).
    pub changed_by: Option<String>,
    /// When.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub changed_at: DateTime<Utc>,
}

/// One order with everything the worker knows of it, and its status history.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderDetailResponse {
    /// The order.
    #[serde(flatten)]
    pub order: OrderResponse,
    /// Its owner's email.
    #[schema(example = "ada@example.com")]
    pub user_email: String,
    /// Attempts the worker has made.
    pub attempts: i32,
    /// The claim token of the worker holding it, while `PROCESSING`.
    pub locked_by: Option<String>,
    /// When that worker's lease ends.
    #[serde(serialize_with = "crate::timestamp::serialize_option")]
    pub lease_until: Option<DateTime<Utc>>,
    /// When its job was last pushed to Redis (`null`: not pushed since it was created or re-driven).
    #[serde(serialize_with = "crate::timestamp::serialize_option")]
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When it was parked (its attempts ran out), while it is.
    #[serde(serialize_with = "crate::timestamp::serialize_option")]
    pub parked_at: Option<DateTime<Utc>>,
    /// Why its last attempt failed, if one did.
    pub last_error: Option<String>,
    /// Every status change, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

/// One order, whoever owns it, with its worker-side fields and its status history as a timeline.
#[utoipa::path(get, path = "/admin/orders/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, body = OrderDetailResponse, description = "The order and its timeline"),
        (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
        (status = 404, body = crate::error::ErrorBody, description = "No such order", example = json!({"detail": "Order not found"})),
        (status = 422, body = crate::error::ValidationErrorBody, description = "Malformed id", example = json!({"detail": [{"loc": ["path", "id"], "msg": "Input should be a valid UUID, invalid character: found `n` at 0", "type": "uuid_parsing"}]})),
        (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
        (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable or too slow", headers(("Retry-After" = u64))),
    ))]
pub(super) async fn order_detail(
    State(state): State<AppState>,
    _admin: AdminUser,
    OrderPath(id): OrderPath,
) -> ApiResult<JsonResponse<OrderDetailResponse>> {
    let (detail, history) = tokio::try_join!(
        db::find_order_detail(&state.db, id),
        db::order_history(&state.db, id)
    )?;
    let detail = detail.ok_or(ApiError::NotFound("Order not found"))?;
    Ok(JsonResponse(OrderDetailResponse {
        order: detail.order.into(),
        user_email: detail.user_email,
        attempts: detail.attempts,
        locked_by: detail.locked_by,
        lease_until: detail.lease_until,
        enqueued_at: detail.enqueued_at,
        parked_at: detail.parked_at,
        last_error: detail.last_error,
        timeline: history
            .into_iter()
            .map(|entry| TimelineEntry {
                id: entry.id,
                status: entry.status,
                changed_by: entry.changed_by,
                changed_at: entry.changed_at,
            })
            .collect(),
    }))
}

/// Watches one order, whoever owns it: the events of `GET /orders/{id}/events` (the order now, then each change until
/// it is COMPLETED or CANCELLED; `Last-Event-ID` resumes, and `204` says nothing more will come), for the console's
/// order page. Besides ending with its token and its session, it ends within 5 s of the reader losing the admin
/// role. Counts against the caller's event streams (`SSE_MAX_STREAMS_PER_USER`).
#[utoipa::path(get, path = "/admin/orders/{id}/events", tag = "admin", security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The order's id"),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "The id of the last event received: the stream resumes after it. Event ids are whole numbers, 0 or more"),
    ),
    responses(
        (status = 200, description = "Events `status`, each with `id` and the order as JSON `data`; the stream ends after COMPLETED or CANCELLED",
            content(("text/event-stream", item_schema = crate::openapi::StatusEvent, example = json!("event: status\nid: 0\ndata: {\"id\":\"01a2…\",\"status\":\"PENDING\",…}\n\n")))),
        (status = 204, description = "Nothing more to send: the order is finished and `Last-Event-ID` was its last change"),
        (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
        (status = 404, body = crate::error::ErrorBody, description = "No such order", example = json!({"detail": "Order not found"})),
        (status = 422, body = crate::error::ValidationErrorBody, description = "Malformed id or Last-Event-ID", example = json!({"detail": [{"loc": ["path", "id"], "msg": "Input should be a valid UUID, invalid character: found `n` at 0", "type": "uuid_parsing"}]})),
        (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded, or SSE_MAX_STREAMS_PER_USER streams are open already", headers(("Retry-After" = u64))),
        (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable, or this server holds SSE_MAX_STREAMS streams", headers(("Retry-After" = u64))),
    ))]
pub(super) async fn order_events(
    State(state): State<AppState>,
    Extension(lifetime): Extension<MaxLifetime>,
    admin: AdminUser,
    OrderPath(id): OrderPath,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let after = last_event_id(&headers)?;
    let reader = OrderReader {
        user: admin.member.id,
        authority: Authority {
            session: admin.session,
            expires_at: admin.expires_at,
        },
        owner: None,
    };
    let demoted = role_lost(state.db.clone(), admin.member.id, ROLE_RECHECK);
    order_stream(&state, reader, id, after, lifetime, demoted).await
}

/// Orders to re-drive: by id, or every order a search matches; at most 1,000 either way. Exactly one of `ids` and
/// `search`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only describes the body; `Redrive` reads it
pub enum RedriveRequest {
    /// By id.
    Ids {
        /// The orders' ids (1–1,000).
        #[schema(min_items = 1, max_items = 1000)]
        ids: Vec<Uuid>,
    },
    /// Every order a search matches.
    Search {
        /// The filters of `GET /admin/orders`, matching at most 1,000 orders.
        search: SearchFilters,
    },
}

/// A search as a body gives it: a JSON object, and nothing else (serde alone would also read the filters from an
/// array, in their order).
struct SearchObject(SearchFilters);

impl<'de> Deserialize<'de> for SearchObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object = serde_json::Map::<String, Value>::deserialize(deserializer)?;
        serde_json::from_value(Value::Object(object))
            .map(SearchObject)
            .map_err(serde::de::Error::custom)
    }
}

/// A re-drive's body, as read.
#[derive(Debug)]
pub struct Redrive {
    ids: Option<Vec<Uuid>>,
    search: Option<SearchFilters>,
}

impl FromFields for Redrive {
    fn from_fields(fields: &mut Fields) -> Option<Self> {
        match (fields.has("ids"), fields.has("search")) {
            (true, true) => {
                // Both taken, so that neither is reported as unknown as well.
                let _ = fields.take_raw("ids");
                let _ = fields.take_raw("search");
                let _ = fields.check::<()>(
                    "search",
                    Err(orders_core::domain::Invalid {
                        kind: "value_error",
                        message: "Give either ids or search, not both".into(),
                    }),
                );
                None
            }
            (false, true) => Some(Self {
                ids: None,
                search: Some(fields.take::<SearchObject>("search")?.0),
            }),
            _ => {
                let ids: Vec<Uuid> = fields.take("ids")?;
                let count = ids.len();
                let ids = fields.check(
                    "ids",
                    if count == 0 {
                        Err(orders_core::domain::Invalid {
                            kind: "too_short",
                            message: "List should have at least 1 item".into(),
                        })
                    } else if count > MAX_ACTION_ORDERS {
                        Err(orders_core::domain::Invalid {
                            kind: "too_long",
                            message: format!(
                                "List should have at most {MAX_ACTION_ORDERS} items, not {count}"
                            ),
                        })
                    } else {
                        Ok(ids)
                    },
                )?;
                Some(Self {
                    ids: Some(ids),
                    search: None,
                })
            }
        }
    }
}

/// What an action did to one order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ActionResult {
    /// The order.
    pub id: Uuid,
    /// `requeued` (re-driven: unparked, attempts reset, queued again), `not_stuck` (finished, or held by a live
    /// worker: left alone), `cancelled`, `not_pending` (cannot be cancelled: left alone) or `not_found`.
    #[schema(example = "requeued")]
    pub result: &'static str,
    /// Its status after the action (`null` when not found).
    pub status: Option<OrderStatus>,
}

/// What an operator action did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionResponse {
    /// The audit log entry that records it.
    pub audit_id: i64,
    /// Whether the re-driven orders' jobs were pushed to Redis now; otherwise the worker's reconciler queues them
    /// within its interval (the queue was full, or Redis did not answer). Always false for a cancel.
    pub pushed: bool,
    /// One entry per order, in the order asked (for a search, newest first).
    pub results: Vec<ActionResult>,
}

/// Re-drives parked or stuck orders, as `worker requeue` does: each `PENDING` order, or `PROCESSING` order whose
/// worker's lease ran out, is unparked, its attempts reset to 0, and its job pushed again. Finished orders and
/// orders held by a live worker are left alone (`not_stuck`). Needs the operator role; written to the audit log.
#[utoipa::path(post, path = "/admin/orders/redrive", tag = "admin", security(("bearer" = [])),
    request_body(content = RedriveRequest, example = json!({"search": {"parked": true}})),
    responses(
        (status = 200, body = ActionResponse, description = "What became of each order"),
        (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 403, body = crate::error::ErrorBody, description = "Not an operator, or (console cookie) a missing or wrong X-CSRF-Token", example = json!({"detail": "This action needs the operator role"})),
        (status = 413, body = crate::error::ErrorBody, description = "Request body larger than 64 KiB"),
        (status = 415, body = crate::error::ErrorBody, description = "Content-Type is not application/json"),
        (status = 422, body = crate::error::ValidationErrorBody, description = "Neither or both of ids and search, more than 1,000 orders, or a bad filter", example = json!({"detail": [{"loc": ["body", "ids"], "msg": "List should have at most 1000 items, not 1001", "type": "too_long"}]})),
        (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
        (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable or too slow", headers(("Retry-After" = u64))),
    ))]
pub(super) async fn redrive_orders(
    State(state): State<AppState>,
    Operator(operator): Operator,
    Json(body): Json<Redrive>,
) -> ApiResult<JsonResponse<ActionResponse>> {
    let (ids, request) = match (body.ids, body.search) {
        (Some(ids), _) => {
            let request = json!({ "ids": ids });
            (distinct(ids.into_iter().map(OrderId)), request)
        }
        (None, Some(search)) => {
            let filter = search.parse(&["body", "search"])?;
            let mut conn = state.db.acquire().await?;
            let ids =
                db::search_order_ids(&mut conn, &filter, MAX_ACTION_ORDERS as i64 + 1).await?;
            if ids.len() > MAX_ACTION_ORDERS {
                return Err(ApiError::field(
                    loc!["body", "search"],
                    "too_long",
                    format!(
                        "The search matches more than {MAX_ACTION_ORDERS} orders: narrow it, or act in steps"
                    ),
                ));
            }
            (ids, json!({ "search": search }))
        }
        (None, None) => return Err(anyhow::anyhow!("a redrive body without ids or search").into()),
    };
    let mut tx = state.db.begin().await?;
    let before = db::order_states(&mut *tx, &ids).await?;
    let requeued = orders_db::requeue(&mut *tx, &ids).await?;
    let results: Vec<ActionResult> = ids
        .iter()
        .map(|id| {
            if let Some(order) = requeued.iter().find(|order| order.id == *id) {
                ActionResult {
                    id: id.0,
                    result: "requeued",
                    status: Some(order.status),
                }
            } else if let Some(state) = before.iter().find(|state| state.id == *id) {
                ActionResult {
                    id: id.0,
                    result: "not_stuck",
                    status: Some(state.status),
                }
            } else {
                ActionResult {
                    id: id.0,
                    result: "not_found",
                    status: None,
                }
            }
        })
        .collect();
    let audit_id = db::insert_audit(
        &mut *tx,
        &NewAuditEntry {
            actor_id: operator.member.id,
            actor_email: &operator.member.email,
            action: "redrive",
            order_ids: &ids,
            request: &request,
            result: &serde_json::to_value(&results).map_err(anyhow::Error::from)?,
        },
    )
    .await?;
    tx.commit().await?;
    let requeued: Vec<OrderId> = requeued.iter().map(|order| order.id).collect();
    tracing::info!(operator = %operator.member.email, orders = requeued.len(), audit_id, "orders re-driven");
    let pushed = push_now(&state, &requeued).await;
    Ok(JsonResponse(ActionResponse {
        audit_id,
        pushed,
        results,
    }))
}

/// Each id once, in the order given.
fn distinct(ids: impl Iterator<Item = OrderId>) -> Vec<OrderId> {
    let mut seen = HashSet::new();
    ids.filter(|id| seen.insert(*id)).collect()
}

/// Pushes the jobs of re-driven orders now, if the queue has room for all of them and no backlog is being fed
/// (otherwise they wait their turn in PostgreSQL, as new orders do, and the reconciler queues them); records the
/// push so that the reconciler does not repeat it. Returns whether they were pushed.
async fn push_now(state: &AppState, ids: &[OrderId]) -> bool {
    if ids.is_empty() {
        return false;
    }
    let room = match state.queue.depth(state.enqueue_timeout).await {
        Ok(depth) if !depth.backlog => state.queue.max_jobs().saturating_sub(depth.waiting()),
        _ => 0,
    };
    if room < ids.len() as u64 {
        return false;
    }
    if let Err(err) = state.queue.push_orders(ids, state.enqueue_timeout).await {
        tracing::warn!(error = %err, "cannot push re-driven orders; the reconciler will");
        return false;
    }
    if let Err(err) = db::mark_enqueued(&state.db, ids).await {
        tracing::debug!(error = %err, "cannot record the push of re-driven orders; the reconciler may repeat it");
    }
    true
}

/// Cancels any user's `PENDING` order, as its owner can: the change shows on the order's live streams and in its
/// history, recorded as made by `operator:<email>`. Needs the operator role; written to the audit log.
#[utoipa::path(post, path = "/admin/orders/{id}/cancel", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, body = ActionResponse, description = "What became of the order: `cancelled`, or `not_pending` (left alone)"),
        (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
        (status = 403, body = crate::error::ErrorBody, description = "Not an operator, or (console cookie) a missing or wrong X-CSRF-Token", example = json!({"detail": "This action needs the operator role"})),
        (status = 404, body = crate::error::ErrorBody, description = "No such order", example = json!({"detail": "Order not found"})),
        (status = 422, body = crate::error::ValidationErrorBody, description = "Malformed id", example = json!({"detail": [{"loc": ["path", "id"], "msg": "Input should be a valid UUID, invalid character: found `n` at 0", "type": "uuid_parsing"}]})),
        (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
        (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable or too slow", headers(("Retry-After" = u64))),
    ))]
pub(super) async fn cancel_order(
    State(state): State<AppState>,
    Operator(operator): Operator,
    OrderPath(id): OrderPath,
) -> ApiResult<JsonResponse<ActionResponse>> {
    let mut tx = state.db.begin().await?;
    let changed_by = format!("operator:{}", operator.member.email);
    let result = match orders_db::cancel_pending(&mut *tx, id, None, Some(&changed_by)).await? {
        Some(order) => ActionResult {
            id: id.0,
            result: "cancelled",
            status: Some(order.status),
        },
        None => match db::order_states(&mut *tx, &[id]).await?.first() {
            Some(state) => ActionResult {
                id: id.0,
                result: "not_pending",
                status: Some(state.status),
            },
            None => return Err(ApiError::NotFound("Order not found")),
        },
    };
    let results = vec![result];
    let audit_id = db::insert_audit(
        &mut *tx,
        &NewAuditEntry {
            actor_id: operator.member.id,
            actor_email: &operator.member.email,
            action: "cancel",
            order_ids: &[id],
            request: &json!({ "id": id.0 }),
            result: &serde_json::to_value(&results).map_err(anyhow::Error::from)?,
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(operator = %operator.member.email, order_id = %id, result = results[0].result, audit_id, "operator cancel");
    Ok(JsonResponse(ActionResponse {
        audit_id,
        pushed: false,
        results,
    }))
}
