//! The HTTP routes, one module per resource. Each exports `router()`, built with utoipa's `OpenApiRouter` so
//! the OpenAPI document is generated from the very routes that are served.

pub mod auth;
pub mod events;
pub mod health;
pub mod orders;
