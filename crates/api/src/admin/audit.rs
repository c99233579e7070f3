//! The audit log of operator actions, newest first.

use axum::{
    Json as JsonResponse,
    extract::State,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use orders_core::{
    db::admin::{self as db, AuditEntry},
    domain::OrderId,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::access::AdminUser;
use crate::{
    error::{ApiError, ApiResult},
    extract::Query,
    loc,
    routes::orders::{link_next, next_page, page_limit},
    state::AppState,
};

/// Which entries of the audit log, and paging.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only the entries of actions on this order.
    order_id: Option<Uuid>,
    /// Page size, 1–100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// Where the previous page ended: copy it from that page's `Link: <…>; rel="next"` header.
    #[param(pattern = r"^[1-9][0-9]{0,18}$")]
    cursor: Option<String>,
}

/// One operator action.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntryResponse {
    /// The entry's id; newer entries have larger ids.
    pub id: i64,
    /// When the action was taken.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub at: DateTime<Utc>,
    /// Who took it.
    pub actor_id: Uuid,
    /// Their email then.
    #[schema(example = "operator@example.com")]
    pub actor_email: String,
    /// `redrive` or `cancel`.
    #[schema(example = "redrive")]
    pub action: String,
    /// The orders concerned.
    pub order_ids: Vec<Uuid>,
    /// The request as sent (`{"ids": [...]}`, `{"search": {...}}` or `{"id": ...}`).
    #[schema(value_type = Object)]
    pub request: Value,
    /// What became of each order, as the action answered.
    #[schema(value_type = Vec<Object>)]
    pub result: Value,
}

impl From<AuditEntry> for AuditEntryResponse {
    fn from(entry: AuditEntry) -> Self {
        Self {
            id: entry.id,
            at: entry.at,
            actor_id: entry.actor_id,
            actor_email: entry.actor_email,
            action: entry.action,
            order_ids: entry.order_ids,
            request: entry.request,
            result: entry.result,
        }
    }
}

/// The audit log: every operator action, newest first, or with `order_id` those on one order. Page with `limit`
/// (1–100, default 50): when more entries exist, the `Link` header (rel="next") holds the URL of the next page.
#[utoipa::path(get, path = "/admin/audit", tag = "admin", security(("bearer" = [])), params(AuditQuery), responses(
    (status = 200, body = Vec<AuditEntryResponse>, description = "Entries, newest first", headers(("Link" = String, description = "`</admin/audit?limit=...&cursor=...>; rel=\"next\"` when more entries exist"))),
    (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
    (status = 422, body = crate::error::ValidationErrorBody, description = "Bad order id, limit or cursor", example = json!({"detail": [{"loc": ["query", "limit"], "msg": "Input should be less than or equal to 100", "type": "less_than_equal"}]})),
    (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
    (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable or too slow", headers(("Retry-After" = u64))),
))]
pub(super) async fn list_audit(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<AuditQuery>,
) -> ApiResult<Response> {
    let limit = page_limit(query.limit)?;
    let before = match query.cursor.as_deref() {
        None => None,
        Some(raw) => Some(
            // Any id the pattern allows; one past the newest entry lists from the newest.
            raw.parse::<u64>()
                .ok()
                .filter(|id| *id > 0 && id.to_string() == raw)
                .map(|id| i64::try_from(id).unwrap_or(i64::MAX))
                .ok_or_else(|| {
                    ApiError::field(
                        loc!["query", "cursor"],
                        "value_error",
                        "Invalid cursor: use the one from a Link header",
                    )
                })?,
        ),
    };
    let order = query.order_id.map(OrderId);
    let mut entries = db::list_audit(&state.db, order, before, limit + 1).await?;
    let next = next_page(&mut entries, limit).map(|entry| entry.id);
    let page: Vec<AuditEntryResponse> = entries.into_iter().map(Into::into).collect();
    let mut response = JsonResponse(page).into_response();
    if let Some(next) = next {
        let only = query
            .order_id
            .map_or_else(String::new, |id| format!("order_id={id}&"));
        link_next(
            &mut response,
            &format!("/admin/audit?{only}limit={limit}&cursor={next}"),
        );
    }
    Ok(response)
}
