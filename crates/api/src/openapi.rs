//! The OpenAPI document's frame; the paths and schemas come from the routes themselves.

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

/// Title, description, tags and the bearer scheme.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Orders API",
        description = "Register, log in, and create, list and cancel orders that a worker processes \
                       PENDING → PROCESSING → COMPLETED. Authorize with the `access_token` from `/auth/login`."
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "auth", description = "Accounts and sessions"),
        (name = "orders", description = "Orders of the logged-in user"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme that protected routes name.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Marks every request body (`…Request`) as closed (`additionalProperties: false`), as the server treats it:
/// an unknown field is a 422. The bodies are read field by field (`extract::FromFields`), not through serde,
/// so utoipa cannot see it from a `deny_unknown_fields`.
pub fn close_request_bodies(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{
        RefOr,
        schema::{AdditionalProperties, Schema},
    };
    let Some(components) = openapi.components.as_mut() else {
        return;
    };
    for (name, schema) in components.schemas.iter_mut() {
        if let (true, RefOr::T(Schema::Object(object))) = (name.ends_with("Request"), schema) {
            object.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        }
    }
}
