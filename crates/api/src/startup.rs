//! Builds the application from its configuration and serves it. `main` is a shim over this, and the tests
//! use it too, binding port 0.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use orders_core::queue::{self, OrderQueue, gauges::BacklogGauges};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    auth::{jwt::JwtKeys, password::PasswordHasher},
    config::Config,
    error::{ApiError, ErrorBody},
    extract::BODY_LIMIT,
    openapi::ApiDoc,
    rate_limit::{ClientKey, RouteLimits},
    routes,
    state::AppState,
};

/// A request that takes longer than this is answered 503: every dependency has a shorter timeout of its own,
/// so this only catches what slips through.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(4500);

/// A bound listener and the application to serve on it, with the in-process worker if asked for.
pub struct App {
    listener: TcpListener,
    router: Router,
    worker: Option<(
        worker::WorkerSettings,
        orders_core::config::QueueConfig,
        PgPool,
    )>,
}

impl App {
    /// Connects to PostgreSQL (creating and migrating the database), opens the queue and binds `BIND_ADDR`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let db = orders_core::db::connect(&config.database).await?;
        let queue = queue::order_queue(&config.queue)?;
        Self::build_with(config, db, queue).await
    }

    /// Like [`App::build`], with an existing pool and queue (tests bring their own).
    pub async fn build_with(config: Config, db: PgPool, queue: OrderQueue) -> anyhow::Result<Self> {
        config.validate()?;
        let worker = config
            .with_worker
            .then(|| (config.worker.clone(), config.queue.clone(), db.clone()));
        orders_core::telemetry::prometheus();
        crate::metrics::register();
        let state = AppState {
            db,
            queue,
            jwt: Arc::new(JwtKeys::new(
                config.jwt_secret.expose_secret().as_bytes(),
                config.algorithm()?,
                config.access_ttl(),
                config.refresh_ttl(),
            )),
            passwords: PasswordHasher::new(config.password_hash_concurrency)?,
            enqueue_timeout: config.enqueue_timeout(),
        };
        let router = router(state, &config);
        let listener = TcpListener::bind(config.bind_addr).await.with_context(|| {
            format!(
                "cannot listen on {} (is the port in use? set BIND_ADDR)",
                config.bind_addr
            )
        })?;
        Ok(Self {
            listener,
            router,
            worker,
        })
    }

    /// The address actually bound (its port is the real one when `BIND_ADDR` asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves (and runs the worker, with `--with-worker`) until `stop` is cancelled, then finishes the
    /// requests and jobs in flight.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<()> {
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, "listening; Swagger UI at /docs");
        }
        let worker = async {
            match self.worker {
                Some((settings, queue, db)) => worker::run(settings, queue, db, stop.clone()).await,
                None => Ok(()),
            }
        };
        let server = axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.clone().cancelled_owned());
        let (served, worked) = tokio::join!(server, worker);
        served?;
        worked
    }
}

/// The routes with their middleware, and the OpenAPI document generated from them.
pub fn router(state: AppState, config: &Config) -> Router {
    let per_route = RouteLimits {
        enabled: config.rate_limits.rate_limit_enabled,
        key: ClientKey {
            trust_proxy_headers: config.trust_proxy_headers,
        },
    };
    let gauges = Arc::new(BacklogGauges::new(state.db.clone(), state.queue.clone()));
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::health::router())
        .merge(routes::auth::router(&config.rate_limits, per_route))
        .merge(routes::orders::router(&config.rate_limits, per_route))
        .with_state(state)
        .split_for_parts();
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .route(
            "/metrics",
            get(move || crate::metrics::render(gauges.clone())),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(time_limit))
        .layer(middleware::from_fn(crate::metrics::track))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let request_id = req.headers().get(X_REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default();
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(middleware::from_fn(drop_unusable_request_id))
}

/// A client's `X-Request-Id` is kept for correlation if it is short and plain; anything else is replaced by a
/// generated one, so that it cannot flood or forge log lines.
async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let usable = req.headers().get(X_REQUEST_ID).is_none_or(|value| {
        let bytes = value.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    });
    if !usable {
        req.headers_mut().remove(X_REQUEST_ID);
    }
    next.run(req).await
}

const X_REQUEST_ID: &str = "x-request-id";

/// Answers 503 instead of letting a request hang.
async fn time_limit(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable("request timed out".into()).into_response(),
    }
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            detail: "Not Found".into(),
        }),
    )
}

async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            detail: "Method Not Allowed".into(),
        }),
    )
}
