//! The HTTP routes, one module per resource. Each exports `router()`, built with utoipa's `OpenApiRouter` so
//! the OpenAPI document is generated from the very routes that are served.

pub mod auth;
pub mod health;
pub mod orders;

use utoipa_axum::router::OpenApiRouter;

use crate::{rate_limit::RateLimitLayer, state::AppState};

/// Wraps a router holding one route in that route's rate limit, if it has one.
fn limited(
    router: OpenApiRouter<AppState>,
    limit: Option<RateLimitLayer>,
) -> OpenApiRouter<AppState> {
    match limit {
        Some(layer) => router.layer(layer),
        None => router,
    }
}
