//! The operations console: web pages under `/console` where viewers watch the system and operators steer it.
//!
//! The console is one more client of the admin API (`/admin/...`). Its pages are static HTML with one small script
//! that calls the JSON API with the `console_token` cookie, and the API decides everything: who may read, who may
//! act, the CSRF check. So the console holds no SQL and no rule of its own, a viewer who edits the page still
//! cannot act, and what the console does is what the OpenAPI document describes. Server-rendered pages would have
//! needed the admin API's queries and role checks a second time, and a script the live overview needs anyway.
//! Everything is embedded in the binary (no CDN, no build step): the pages, one stylesheet, one script, an icon.
//!
//! What this module serves itself: the pages (a browser without a session is sent to the login form), the assets,
//! and the session: `POST /console/login` (an HTML form, checked exactly as `/auth/login` is), `POST
//! /console/refresh` and `POST /console/logout`. Every answer carries a strict Content-Security-Policy (scripts and
//! styles from the console's own files only, no framing) and is not stored by caches, assets aside.

pub mod cookies;
mod pages;
mod session;

use std::sync::Arc;

use axum::{
    Router,
    extract::{FromRef, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::{MethodRouter, get, post},
};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use self::{
    cookies::{REFRESH, TOKEN},
    pages::{LoginForm, Pages, Screen},
};
use crate::{
    config::RateLimits, rate_limit::RouteLimits, routes::auth::identify_client, state::AppState,
};

/// What the console's handlers share: the application's state and the composed pages.
#[derive(Clone)]
pub(crate) struct ConsoleState {
    app: AppState,
    pages: Arc<Pages>,
}

impl FromRef<ConsoleState> for AppState {
    fn from_ref(state: &ConsoleState) -> Self {
        state.app.clone()
    }
}

/// The console's routes. The login form counts against the same limits as `/auth/login` (the rate limit per
/// client, shared with it, and the login throttle), and the refresh against `/auth/refresh`'s.
pub fn router(app: AppState, limits: &RateLimits, per_route: &RouteLimits) -> Router {
    let state = ConsoleState {
        app,
        pages: Arc::new(Pages::new()),
    };
    let login = per_route
        .apply(
            OpenApiRouter::new().route("/console/login", post(session::login)),
            "login",
            limits.rate_limit_login_per_minute,
        )
        .layer(middleware::from_fn_with_state(
            per_route.key,
            identify_client,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limited_login_as_form,
        ));
    let refresh = per_route.apply(
        OpenApiRouter::new().route("/console/refresh", post(session::refresh)),
        "refresh",
        limits.rate_limit_refresh_per_minute,
    );
    let session = OpenApiRouter::new()
        .route("/console/login", get(session::login_form))
        .route("/console/logout", post(session::logout))
        .merge(login)
        .merge(refresh);
    Router::from(session)
        .route("/console", screen(Screen::Overview))
        .route(
            "/console/",
            get(|| async { Redirect::permanent("/console") }),
        )
        .route("/console/workers", screen(Screen::Workers))
        .route("/console/orders", screen(Screen::Orders))
        .route("/console/orders/{id}", get(order_page))
        .route("/console/parked", screen(Screen::Parked))
        .route("/console/audit", screen(Screen::Audit))
        .route("/console/assets/{name}", get(asset))
        .route("/console/{*rest}", get(not_found))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// The page of `screen`, for a browser that holds a session; any other goes to the login form, which comes back
/// here afterwards.
fn screen(screen: Screen) -> MethodRouter<ConsoleState> {
    get(
        move |State(state): State<ConsoleState>, headers: HeaderMap, uri: Uri| async move {
            show(&state, screen, &headers, &uri)
        },
    )
}

fn show(state: &ConsoleState, screen: Screen, headers: &HeaderMap, uri: &Uri) -> Response {
    // The access token may have expired (its cookie with it) while the refresh token lives on: the page's script
    // refreshes the session then. Whether the account may see anything is the admin API's to say.
    if TOKEN.read(headers).is_none() && REFRESH.read(headers).is_none() {
        let here = uri.path_and_query().map_or("/console", |p| p.as_str());
        let next: String = form_urlencoded::byte_serialize(here.as_bytes()).collect();
        return session::see_other(&format!("/console/login?next={next}"));
    }
    state.pages.screen(screen)
}

/// An order's page; `404` for a path that is not an order id.
async fn order_page(State(state): State<ConsoleState>, headers: HeaderMap, uri: Uri) -> Response {
    let id = uri.path().rsplit('/').next().unwrap_or_default();
    if Uuid::parse_str(id).is_err() {
        return not_found(State(state)).await;
    }
    show(&state, Screen::Order, &headers, &uri)
}

async fn asset(State(state): State<ConsoleState>, uri: Uri) -> Response {
    let name = uri.path().rsplit('/').next().unwrap_or_default();
    match state.pages.asset(name) {
        Some(response) => response,
        None => not_found(State(state)).await,
    }
}

async fn not_found(State(state): State<ConsoleState>) -> Response {
    state.pages.notice(
        StatusCode::NOT_FOUND,
        "Page not found",
        "The console has no such page.",
        ("/console", "Go to the overview"),
    )
}

/// The login form instead of the rate limit's JSON `429`, so that a person who tries too often reads why.
async fn limited_login_as_form(
    State(state): State<ConsoleState>,
    request: Request,
    next: Next,
) -> Response {
    let csrf = cookies::CSRF.read(request.headers()).map(str::to_owned);
    let response = next.run(request).await;
    if response.status() != StatusCode::TOO_MANY_REQUESTS
        || response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|kind| kind != "application/json")
    {
        return response;
    }
    let form = LoginForm {
        message: Some("Too many login attempts from this address. Wait a minute, then try again."),
        csrf: csrf.as_deref().unwrap_or_default(),
        ..LoginForm::default()
    };
    let mut page = state.pages.login(StatusCode::TOO_MANY_REQUESTS, &form);
    if let Some(retry_after) = response.headers().get(header::RETRY_AFTER) {
        page.headers_mut()
            .insert(header::RETRY_AFTER, retry_after.clone());
    }
    page
}

/// Scripts, styles, images and requests from the console's own origin only; no inline script or style, no
/// plugin, no framing, forms that post only to the console.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The headers of every console answer. Pages are never stored (they follow the session); assets say otherwise
/// themselves.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ] {
        headers.insert(name, value);
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response.into_response()
}
