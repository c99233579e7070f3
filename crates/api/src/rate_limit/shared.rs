//! Rate limits shared by every api process through Redis, so that N replicas behind a load balancer hold each
//! limit of API.md once, not N times.
//!
//! Each decision is one script run (GCRA, `gcra.lua`): one round trip and one atomic step, against Redis's own
//! clock. The per-process limiter (tower_governor) stays behind it as the second line: when Redis does not
//! answer within [`DECISION_TIMEOUT`], the request goes on to the per-process limit instead of failing, so an
//! outage turns the limits back into per-process ones (logged once, and counted in
//! `rate_limit_local_decisions_total`), never into 500s or an open door.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
};
use redis::{Script, aio::ConnectionManager};

use super::ClientKey;
use crate::error::ApiError;

/// Longest wait for one decision before the request goes on to the per-process limit.
pub const DECISION_TIMEOUT: Duration = Duration::from_millis(250);
/// After Redis failed a decision, how long the per-process limits decide alone before Redis is asked again (so
/// an unreachable Redis costs no request a timeout more than once a second).
pub const RETRY_SHARED_AFTER: Duration = Duration::from_secs(1);

static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("gcra.lua")));

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const AFTER: HeaderName = HeaderName::from_static("x-ratelimit-after");

/// What the shared limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It passes; `remaining` more would pass right now.
    Allowed {
        /// Requests left in the burst.
        remaining: u64,
    },
    /// Over the limit: the next request passes after `wait`.
    Refused {
        /// Time until a request can pass.
        wait: Duration,
    },
}

/// The limits' keys in Redis, and whether Redis is answering. Cheap to clone.
#[derive(Clone)]
pub struct SharedLimits {
    conn: ConnectionManager,
    prefix: Arc<str>,
    health: Arc<Health>,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Limits counted under `<queue_name>:ratelimit:` over `conn` (every process with the same `QUEUE_NAME`
    /// shares them).
    pub fn new(conn: ConnectionManager, queue_name: &str) -> Self {
        Self {
            conn,
            prefix: format!("{queue_name}:ratelimit").into(),
            health: Arc::new(Health::new(
                "rate_limit_local_decisions_total",
                "rate limit decisions",
            )),
        }
    }

    /// Decides on one request of `client` (an address, or a user for limits per user) to `route`, limited to a
    /// burst of `per_minute` refilled at `per_minute` a minute; `None` when Redis cannot decide (the per-process
    /// limit does).
    pub async fn decide(
        &self,
        route: &str,
        client: impl std::fmt::Display,
        per_minute: u32,
    ) -> Option<Decision> {
        if self.health.skipping() {
            return None;
        }
        let per_minute = per_minute.max(1);
        let mut invocation = GCRA.key(format!("{}:{route}:{client}", self.prefix));
        invocation
            .arg(60_000 / u64::from(per_minute))
            .arg(per_minute);
        let mut conn = self.conn.clone();
        let answer = tokio::time::timeout(
            DECISION_TIMEOUT,
            invocation.invoke_async::<(u8, u64, u64)>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok((allowed, remaining, wait_ms))) => {
                self.health.answered();
                Some(if allowed == 1 {
                    Decision::Allowed { remaining }
                } else {
                    Decision::Refused {
                        wait: Duration::from_millis(wait_ms),
                    }
                })
            }
            Ok(Err(err)) => {
                self.health.failed(&err.to_string());
                None
            }
            Err(_) => {
                self.health.failed("no answer in time");
                None
            }
        }
    }
}

/// Whether Redis answers shared decisions (rate limits, stream slots); logs each change once, and counts each
/// decision made without it.
pub(crate) struct Health {
    /// The counter of decisions made without Redis.
    counter: &'static str,
    /// What Redis decides, for the log.
    decisions: &'static str,
    epoch: Instant,
    /// Milliseconds after `epoch` until which decisions skip Redis.
    skip_until_ms: AtomicU64,
    down: AtomicBool,
}

impl Health {
    pub(crate) fn new(counter: &'static str, decisions: &'static str) -> Self {
        Self {
            counter,
            decisions,
            epoch: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether Redis failed less than [`RETRY_SHARED_AFTER`] ago: the decision is the process's own (counted).
    pub(crate) fn skipping(&self) -> bool {
        let skipping = self.now_ms() < self.skip_until_ms.load(Ordering::Relaxed);
        if skipping {
            metrics::counter!(self.counter).increment(1);
        }
        skipping
    }

    pub(crate) fn failed(&self, error: &str) {
        metrics::counter!(self.counter).increment(1);
        let retry_at = self.now_ms() + RETRY_SHARED_AFTER.as_millis() as u64;
        self.skip_until_ms.store(retry_at, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error,
                decisions = self.decisions,
                "Redis does not answer shared decisions: each api process counts its own until it does"
            );
        }
    }

    pub(crate) fn answered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(
                decisions = self.decisions,
                "Redis answers shared decisions again"
            );
        }
    }
}

/// One route's shared limit, for [`limit`].
#[derive(Debug, Clone)]
pub struct SharedRoute {
    /// The limits.
    pub limits: SharedLimits,
    /// The route's name in the keys.
    pub route: &'static str,
    /// Its limit per client and minute.
    pub per_minute: u32,
    /// How clients are told apart.
    pub key: ClientKey,
}

/// Middleware: the shared decision, then (if it passes or cannot be made) the per-process limit and the route.
/// An answer of the shared limit sets `X-RateLimit-Limit` and `X-RateLimit-Remaining` from the count of every
/// process; a refusal is the contract's 429 with `Retry-After`.
pub async fn limit(State(route): State<SharedRoute>, req: Request, next: Next) -> Response {
    let Some(client) = route.key.client(&req) else {
        return next.run(req).await;
    };
    match route
        .limits
        .decide(route.route, client, route.per_minute)
        .await
    {
        Some(Decision::Allowed { remaining }) => {
            let mut response = next.run(req).await;
            let headers = response.headers_mut();
            headers.insert(LIMIT, HeaderValue::from(route.per_minute));
            headers.insert(REMAINING, HeaderValue::from(remaining));
            response
        }
        Some(Decision::Refused { wait }) => {
            let retry_after_secs = wait.as_millis().div_ceil(1000).max(1) as u64;
            let mut response = ApiError::TooManyRequests { retry_after_secs }.into_response();
            let headers = response.headers_mut();
            headers.insert(LIMIT, HeaderValue::from(route.per_minute));
            headers.insert(REMAINING, HeaderValue::from(0));
            headers.insert(AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        None => next.run(req).await,
    }
}
