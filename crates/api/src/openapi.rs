//! The OpenAPI document's frame; the paths and schemas come from the routes themselves.

use std::{borrow::Cow, sync::Arc};

use axum::{
    extract::State,
    http::header,
    response::{IntoResponse, Response},
};

use utoipa::{
    Modify, OpenApi, PartialSchema, ToSchema,
    openapi::{
        Ref, RefOr,
        schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_swagger_ui::{Config, SwaggerUi};
use uuid::Uuid;

/// Title, description, tags and the bearer scheme.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Orders API",
        description = "Register, log in, and create, list and cancel orders that a worker processes \
                       PENDING → PROCESSING → COMPLETED. Authorize with the `access_token` from `/auth/login`."
    ),
    modifiers(&BearerScheme),
    components(schemas(StatusEvent, ResetEvent, MyOrdersEvent, crate::admin::overview::OverviewEvent)),
    // In the order a newcomer uses them; within a tag, routes keep the order their routers list them in
    // (utoipa's `preserve_path_order`), which Swagger UI shows as is.
    tags(
        (name = "auth", description = "Accounts and sessions: register, log in, then Authorize with the access token"),
        (name = "orders", description = "Orders of the logged-in user"),
        (name = "health", description = "Liveness and readiness"),
        (name = "admin", description = "The operations console's API: viewers read it, operators also act (`api users set-role`)"),
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

/// The `Idempotency-Key` example as the routes declare it; each copy of the served document has a fresh UUID in
/// its place.
pub(crate) const IDEMPOTENCY_KEY_EXAMPLE: &str = "3f8e2b6c-0d1a-4c5e-9b7f-2a6d8c4e1f00";

/// The document as `/openapi.json` serves it: serialized once, and each copy with a fresh `Idempotency-Key`
/// example, so that Swagger UI's create form suggests a new key at every page load (Execute twice with it returns
/// the same order, as a retry should; a new order wants a new key or a reload).
#[derive(Clone)]
pub struct ServedDocument(Arc<str>);

impl ServedDocument {
    pub fn new(openapi: &utoipa::openapi::OpenApi) -> Self {
        let json = serde_json::to_string(openapi).expect("the OpenAPI document serializes");
        debug_assert_eq!(
            json.matches(IDEMPOTENCY_KEY_EXAMPLE).count(),
            1,
            "the Idempotency-Key example appears once in the document"
        );
        Self(json.into())
    }

    /// `GET /openapi.json`: never cached, so that a reload of Swagger UI gets a new key.
    pub async fn serve(State(document): State<Self>) -> Response {
        let fresh = Uuid::new_v4().to_string();
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            document.0.replacen(IDEMPOTENCY_KEY_EXAMPLE, &fresh, 1),
        )
            .into_response()
    }
}

/// Swagger UI's settings: the authorization survives a reload (kept in the browser's local storage), the request
/// duration shows beside each answer, and every operation's "Try it out" is already open.
pub fn swagger_ui() -> SwaggerUi {
    SwaggerUi::new("/docs").config(
        Config::new(["/openapi.json"])
            .persist_authorization(true)
            .display_request_duration(true)
            .try_it_out_enabled(true),
    )
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
        match (name.ends_with("Request"), schema) {
            (true, RefOr::T(Schema::Object(object))) => {
                object.additional_properties =
                    Some(Box::new(AdditionalProperties::FreeForm(false)));
            }
            // A body of several shapes (`{"ids": ...}` or `{"search": ...}`): each shape is closed.
            (true, RefOr::T(Schema::OneOf(shapes))) => {
                for shape in &mut shapes.items {
                    if let RefOr::T(Schema::Object(object)) = shape {
                        object.additional_properties =
                            Some(Box::new(AdditionalProperties::FreeForm(false)));
                    }
                }
            }
            _ => {}
        }
    }
}

/// One event of `GET /orders/{id}/events` (and of `GET /orders/events`): `event: status`, the order as of one change.
///
/// Events are described as OpenAPI 3.2 describes `text/event-stream` (the `itemSchema` of the response): each as an
/// object of its fields `event`, `id`, `data` and `retry`, with `data` a string whose JSON content is given by
/// `contentMediaType` and `contentSchema`. Comment lines (`:heartbeat`) are not events.
pub struct StatusEvent;

impl PartialSchema for StatusEvent {
    fn schema() -> RefOr<Schema> {
        event(
            "status",
            "An order as of one change of its status.",
            "The change's id (its row in the status history); 0 for an order that has not changed yet.",
            "The order as JSON, the same object as `GET /orders/{id}`, as of that change.",
            Ref::from_schema_name("OrderResponse").into(),
        )
    }
}

impl ToSchema for StatusEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("StatusEvent")
    }
}

/// The event of `GET /orders/events` that replaces a replay too long: `event: reset`.
pub struct ResetEvent;

impl PartialSchema for ResetEvent {
    fn schema() -> RefOr<Schema> {
        let data = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "detail",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("What to do: reload the orders.")),
            )
            .required("detail")
            .property(
                "replays_at_most",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                        utoipa::openapi::KnownFormat::Int64,
                    )))
                    .minimum(Some(1))
                    .description(Some("The most changes a stream replays.")),
            )
            .required("replays_at_most")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .build();
        event(
            "reset",
            "More changes were missed than a stream replays (`Last-Event-ID` too far back): the stream goes on from \
             now, and the client reloads its orders with `GET /orders/my-orders`.",
            "The latest change: a reconnect with it resumes from here.",
            "`{\"detail\", \"replays_at_most\"}` as JSON.",
            Schema::Object(data).into(),
        )
    }
}

impl ToSchema for ResetEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ResetEvent")
    }
}

/// One event of `GET /orders/events`: a status change of any of my orders, or a reset.
pub struct MyOrdersEvent;

impl PartialSchema for MyOrdersEvent {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(Ref::from_schema_name(StatusEvent::name()))
            .item(Ref::from_schema_name(ResetEvent::name()))
            .description(Some(
                "`event: status` for each change of one of my orders; `event: reset` first when `Last-Event-ID` is \
                 too far back.",
            ))
            .into()
    }
}

impl ToSchema for MyOrdersEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("MyOrdersEvent")
    }
}

/// One server-sent event of the kind `kind` as an object of its fields: an `id` always (a whole number), `data` JSON
/// of `content`, and never a `retry` (a client reconnects after its own delay).
pub(crate) fn event(
    kind: &str,
    description: &str,
    id: &str,
    data: &str,
    content: RefOr<Schema>,
) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(format!("`event: {kind}`. {description}")))
        .property(
            "event",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([kind])),
        )
        .required("event")
        .property(
            "id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^(0|[1-9][0-9]{0,18})$"))
                .description(Some(id)),
        )
        .required("id")
        .property(
            "data",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .content_media_type("application/json")
                .content_schema(Some(content))
                .description(Some(data)),
        )
        .required("data")
        .property(
            "retry",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .description(Some(
                    "The reconnection delay in milliseconds: this api does not send it.",
                )),
        )
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .into()
}
