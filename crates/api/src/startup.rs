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
use redis::aio::ConnectionManager;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument as _;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::{
    auth::{jwt::JwtKeys, password::PasswordHasher},
    config::Config,
    error::{ApiError, ErrorBody},
    extract::BODY_LIMIT,
    openapi::ApiDoc,
    rate_limit::{ClientKey, RouteLimits, shared::SharedLimits},
    routes,
    state::{AppState, Shared},
};

/// How often expired sessions and ended login windows are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Connections the `/metrics` listener holds at once: scrapers are few.
const METRICS_MAX_CONNECTIONS: usize = 64;
/// Rows one purge statement deletes at most: a short transaction, however large the table.
const PURGE_BATCH: i64 = 1000;

/// Bound listeners and the application to serve on them, with the in-process worker if asked for.
pub struct App {
    listener: TcpListener,
    router: Router,
    limits: crate::serve::Limits,
    /// `/metrics`, on a listener of its own (`METRICS_ADDR`), unless turned off.
    metrics: Option<(TcpListener, Router)>,
    db: PgPool,
    /// Read once at start for its version and eviction policy, within `redis_timeout`.
    redis: ConnectionManager,
    redis_timeout: Duration,
    /// Ended at shutdown, so that open event streams do not hold the graceful shutdown.
    events: Arc<crate::events::Hub>,
    worker: Option<(
        worker::WorkerSettings,
        orders_core::config::QueueConfig,
        PgPool,
    )>,
    /// Recomputes the admin overview in the background until the stop.
    overview: crate::admin::overview::OverviewRefresher,
}

impl App {
    /// Connects to PostgreSQL (creating and migrating the database), opens the queue and binds `BIND_ADDR`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let db = orders_core::db::connect(&config.database).await?;
        let queue = queue::order_queue(&config.queue)?;
        if !queue.ping(config.queue.redis_timeout()).await {
            tracing::warn!(
                "Redis does not answer (check REDIS_URL): orders are accepted and wait in PostgreSQL until it does"
            );
        }
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
        let gauges = Arc::new(BacklogGauges::new(db.clone(), queue.clone()));
        let redis = queue.connection();
        // Half the pool at most for the inserts of creates, and half for the reads of lists, so that neither
        // starves the other (or the other routes) of connections.
        let batch_slots = (db.options().get_max_connections() as usize / 2).max(1);
        let events = crate::events::Hub::new(
            config.sse_max_streams_per_user,
            config.sse_max_streams,
            crate::events::shared::SharedSlots::new(queue.connection(), &config.queue.queue_name),
        );
        events.spawn_listener(match &config.database_listen_url {
            Some(url) => url
                .parse()
                .context("DATABASE_LISTEN_URL is not a valid PostgreSQL URL")?,
            None => (*db.connect_options()).clone(),
        });
        events.spawn_authority_checks(db.clone());
        let (overview, overview_refresher) = crate::admin::overview::overview(
            db.clone(),
            queue.clone(),
            Duration::from_millis(config.admin_overview_refresh_ms),
            config.queue.redis_timeout(),
        );
        let state = AppState::new(Shared {
            overview,
            events: events.clone(),
            db: db.clone(),
            creates: crate::routes::orders::create_batcher(
                db.clone(),
                queue.clone(),
                config.enqueue_timeout(),
                config.database.statement_timeout(),
                batch_slots,
                config.batch_max_waiting as usize,
            ),
            pages: crate::routes::orders::page_batcher(
                db.clone(),
                batch_slots,
                config.batch_max_waiting as usize,
            ),
            queue,
            jwt: Arc::new(JwtKeys::new(
                config.jwt_secret()?.expose_secret().as_bytes(),
                config.algorithm()?,
                config.access_ttl(),
                config.refresh_ttl(),
            )),
            passwords: PasswordHasher::new(config.password_hash_concurrency)?,
            enqueue_timeout: config.enqueue_timeout(),
            session_max: config.session_max(),
            login_max_failures: config.login_max_failures,
            readiness: Default::default(),
            stream_openings: (config.rate_limits.rate_limit_enabled
                && config.rate_limits.rate_limit_shared
                && config.rate_limits.rate_limit_open_stream_per_minute > 0)
                .then(|| {
                    (
                        SharedLimits::new(redis.clone(), &config.queue.queue_name),
                        config.rate_limits.rate_limit_open_stream_per_minute,
                    )
                }),
        });
        let router = router(state, &config);
        let listener = TcpListener::bind(config.bind_addr).await.with_context(|| {
            format!(
                "cannot listen on {} (is the port in use? set BIND_ADDR)",
                config.bind_addr
            )
        })?;
        let metrics = match config.metrics_addr.as_str() {
            "off" => None,
            addr => {
                let listener = TcpListener::bind(addr).await.with_context(|| {
                    format!("cannot listen on METRICS_ADDR={addr} (set another address, or `off`)")
                })?;
                Some((listener, metrics_router(gauges)))
            }
        };
        Ok(Self {
            listener,
            router,
            limits: config.connection_limits(),
            metrics,
            db,
            redis,
            redis_timeout: config.queue.redis_timeout(),
            events,
            worker,
            overview: overview_refresher,
        })
    }

    /// The address `/metrics` is served on, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// The address actually bound (its port is the real one when `BIND_ADDR` asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves (and runs the worker, with `--with-worker`) until `stop` is cancelled, then finishes the
    /// requests and jobs in flight.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<()> {
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, max_connections = self.limits.max_connections, "listening; Swagger UI at /docs");
        }
        let worker = async {
            match self.worker {
                Some((settings, queue, db)) => worker::run(settings, queue, db, stop.clone()).await,
                None => Ok(()),
            }
        };
        let metrics = async {
            if let Some((listener, router)) = self.metrics {
                if let Ok(addr) = listener.local_addr() {
                    tracing::info!(%addr, "metrics at /metrics");
                }
                let limits = crate::serve::Limits {
                    max_connections: METRICS_MAX_CONNECTIONS,
                    ..self.limits
                };
                crate::serve::serve(listener, router, stop.clone(), limits).await;
            }
        };
        tokio::spawn(purge_periodically(self.db, stop.clone()));
        tokio::spawn(self.overview.run(stop.clone()));
        queue::server::spawn_check(self.redis, self.redis_timeout, "api", stop.clone());
        let events = self.events.shutdown.clone();
        let stopping = stop.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            events.cancel();
        });
        let server = crate::serve::serve(self.listener, self.router, stop.clone(), self.limits);
        let ((), worked, ()) = tokio::join!(server, worker, metrics);
        worked
    }
}

/// The routes with their middleware, and the OpenAPI document generated from them.
pub fn router(state: AppState, config: &Config) -> Router {
    let per_route = RouteLimits {
        enabled: config.rate_limits.rate_limit_enabled,
        key: ClientKey {
            trust_proxy_hops: config.proxy_hops(),
        },
        shared: config
            .rate_limits
            .rate_limit_shared
            .then(|| SharedLimits::new(state.queue.connection(), &config.queue.queue_name)),
    };
    let request_timeout = config.request_timeout();
    let console = crate::console::router(state.clone(), &config.rate_limits, &per_route);
    let (api, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::health::router())
        .merge(routes::auth::router(&config.rate_limits, &per_route))
        .merge(routes::orders::router(&config.rate_limits, &per_route))
        .merge(routes::events::router(
            &config.rate_limits,
            &per_route,
            config.sse_max_stream_seconds.map(Duration::from_secs),
        ))
        .merge(crate::admin::router(
            &config.rate_limits,
            &per_route,
            config.sse_max_stream_seconds.map(Duration::from_secs),
        ))
        .with_state(state)
        .split_for_parts();
    crate::openapi::close_request_bodies(&mut openapi);
    let document = crate::openapi::ServedDocument::new(&openapi);
    api.route(
        "/openapi.json",
        axum::routing::get(crate::openapi::ServedDocument::serve).with_state(document),
    )
    .merge(crate::openapi::swagger_ui())
    .merge(console)
    .fallback(not_found)
    .method_not_allowed_fallback(method_not_allowed)
    .layer(DefaultBodyLimit::max(BODY_LIMIT))
    .layer(middleware::from_fn_with_state(request_timeout, time_limit))
    .layer(middleware::from_fn(crate::metrics::track))
    .layer(middleware::from_fn(in_request_span))
    .layer(PropagateRequestIdLayer::x_request_id())
    .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
    .layer(middleware::from_fn(drop_unusable_request_id))
}

/// Runs the request's handler, and the middleware inside this one, in a span carrying its method, path and
/// request id, so that every line logged for it carries them too.
///
/// Around the handler only, not its response body: an event stream's body lives for hours, and a span kept
/// that long holds its memory all that time (about 0.5 KB, 5 MB for 10,000 streams). A failed response is
/// logged where its cause is known (`ApiError`), once.
async fn in_request_span(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id);
    let started = std::time::Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            latency_ms = started.elapsed().as_millis() as u64,
            "request answered"
        );
    });
    response
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

/// `GET /metrics` alone, with the backlog gauges sampled for each scrape; served on `METRICS_ADDR`.
fn metrics_router(gauges: Arc<BacklogGauges>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || crate::metrics::render(gauges.clone())),
        )
        .fallback(not_found)
}

/// Deletes dead refresh tokens and ended login windows every [`PURGE_INTERVAL`], in batches of
/// [`PURGE_BATCH`] rows, until `stop`. Each api process runs one; they skip each other's rows.
async fn purge_periodically(db: PgPool, stop: CancellationToken) {
    let mut every = tokio::time::interval(PURGE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match purge(&db).await {
            Ok((0, 0)) => {}
            Ok((tokens, logins)) => {
                tracing::info!(tokens, logins, "purged dead sessions and login windows")
            }
            Err(err) => tracing::warn!(error = %err, "purge failed; next round in 10 minutes"),
        }
    }
}

/// One purge round: batches until a batch comes back short. Returns the rows deleted (tokens, login windows).
pub async fn purge(db: &PgPool) -> sqlx::Result<(u64, u64)> {
    use orders_core::db::{login_attempts, sessions};
    let tokens = in_batches(|| sessions::purge_dead_tokens(db, PURGE_BATCH)).await?;
    let window = crate::routes::auth::LOGIN_THROTTLE_WINDOW;
    let logins = in_batches(|| login_attempts::purge_ended(db, window, PURGE_BATCH)).await?;
    Ok((tokens, logins))
}

/// Runs `batch` until it deletes fewer than [`PURGE_BATCH`] rows; returns the rows deleted in all.
async fn in_batches<F, Fut>(mut batch: F) -> sqlx::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<u64>>,
{
    let mut total = 0;
    loop {
        let deleted = batch().await?;
        total += deleted;
        if deleted < PURGE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// When the request timeout answers a request 503 (a request extension): a handler that must answer before
/// that, such as a create, takes its own deadline from it.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub tokio::time::Instant);

/// Answers 503 instead of letting a request hang.
async fn time_limit(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    mut req: Request,
    next: Next,
) -> Response {
    let deadline = tokio::time::Instant::now() + timeout;
    req.extensions_mut().insert(RequestDeadline(deadline));
    match tokio::time::timeout_at(deadline, next.run(req)).await {
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
