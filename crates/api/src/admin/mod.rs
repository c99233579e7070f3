//! The admin API under `/admin`, for the operations console: who is calling, the overview (also as a live
//! stream), the workers, the order search and detail, the operator's actions and their audit log. Viewers and
//! operators read it; only operators act (see [`access`]). Every route is in the OpenAPI document under the `admin`
//! tag.

pub mod access;
pub mod audit;
pub mod orders;
pub mod overview;
pub mod users;
pub mod workers;

use std::time::Duration;

use axum::Json as JsonResponse;
use orders_core::domain::Role;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use self::access::AdminUser;
use crate::{config::RateLimits, events::stream_routes, rate_limit::RouteLimits, state::AppState};

/// How often an admin stream checks that its reader still has an admin role (and, for the overview, that their
/// session is live).
pub(crate) const ROLE_RECHECK: Duration = Duration::from_secs(5);

/// The admin routes: reads within `RATE_LIMIT_ADMIN_PER_MINUTE` per client, actions within
/// `RATE_LIMIT_ADMIN_ACTION_PER_MINUTE`. The streams (the overview's, an order's) last at most
/// `max_lifetime` (`SSE_MAX_STREAM_SECONDS`), when set.
pub fn router(
    limits: &RateLimits,
    per_route: &RouteLimits,
    max_lifetime: Option<Duration>,
) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(stream_routes(
            per_route,
            OpenApiRouter::new()
                .routes(routes!(me))
                .routes(routes!(overview::get_overview))
                .routes(routes!(overview::overview_events))
                .routes(routes!(workers::list_workers))
                .routes(routes!(orders::search_orders))
                .routes(routes!(orders::count_orders))
                .routes(routes!(orders::order_detail))
                .routes(routes!(orders::order_events))
                .routes(routes!(audit::list_audit)),
            "admin",
            limits.rate_limit_admin_per_minute,
            max_lifetime,
        ))
        .merge(
            per_route.apply(
                OpenApiRouter::new()
                    .routes(routes!(orders::redrive_orders))
                    .routes(routes!(orders::cancel_order)),
                "admin_action",
                limits.rate_limit_admin_action_per_minute,
            ),
        )
}

/// The caller, as the console shows them.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    /// Their id.
    pub id: Uuid,
    /// Their email.
    #[schema(example = "operator@example.com")]
    pub email: String,
    /// Their name.
    #[schema(example = "Ada")]
    pub name: String,
    /// `viewer` (reads the admin API) or `operator` (also acts).
    pub role: Role,
}

/// Who is calling, with their role as it is now: what the console may show and offer them.
#[utoipa::path(get, path = "/admin/me", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, body = MeResponse, description = "The caller", example = json!({"id": "01a2490a-3199-72ac-be9d-2b67ed4b65c0", "email": "operator@example.com", "name": "Ada", "role": "operator"})),
    (status = 401, body = crate::error::ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 403, body = crate::error::ErrorBody, description = "Not a viewer or an operator", example = json!({"detail": "The admin API needs the viewer or operator role"})),
    (status = 429, body = crate::error::ErrorBody, description = "Rate limit exceeded", headers(("Retry-After" = u64))),
    (status = 503, body = crate::error::ErrorBody, description = "PostgreSQL unavailable or too slow", headers(("Retry-After" = u64))),
))]
async fn me(admin: AdminUser) -> JsonResponse<MeResponse> {
    JsonResponse(MeResponse {
        id: admin.member.id.0,
        email: admin.member.email,
        name: admin.member.name,
        role: admin.member.role,
    })
}
