//! What every handler can reach: one shared state, cloned per request as one reference count.

use std::{ops::Deref, sync::Arc, time::Duration};

use orders_core::{
    db::{
        batch::Batcher,
        orders::{NewOrder, PageRequest},
    },
    domain::Order,
    queue::OrderQueue,
};
use sqlx::PgPool;
use tracing::Span;

use crate::auth::{jwt::JwtKeys, password::PasswordHasher};

/// The application state: [`Shared`] behind one `Arc`. axum clones the state for every extractor and
/// middleware of every request; cloning the fields one by one (a dozen reference counts, taken and dropped
/// again) was measured at about 6 % of the api's CPU on the list path.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Shares `shared` among handlers.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What the handlers share.
pub struct Shared {
    /// PostgreSQL: the source of truth.
    pub db: PgPool,
    /// The Redis job queue the worker consumes.
    pub queue: OrderQueue,
    /// Inserts and queues new orders in batches (see `routes::orders::create_batcher`).
    pub creates: Batcher<(NewOrder, Span), Option<Order>>,
    /// Reads pages of "my orders" in batches (see `routes::orders::page_batcher`).
    pub pages: Batcher<PageRequest, Vec<Order>>,
    /// Token signing and verification.
    pub jwt: Arc<JwtKeys>,
    /// Argon2id, off the runtime.
    pub passwords: PasswordHasher,
    /// How long a create waits for the queue.
    pub enqueue_timeout: Duration,
    /// Longest life of a session (`SESSION_MAX_DAYS`).
    pub session_max: Duration,
    /// Login attempts allowed per account, client and window (`LOGIN_MAX_FAILURES`); ten times as many per account.
    pub login_max_failures: u32,
    /// Live order status: the listener's signals and the bounds on open streams.
    pub events: Arc<crate::events::Hub>,
    /// The per-user limit on opening event streams (`RATE_LIMIT_OPEN_STREAM_PER_MINUTE`), counted in Redis; `None`
    /// when rate limits are off or not shared (the per-client limit of the routes still holds).
    pub stream_openings: Option<(crate::rate_limit::shared::SharedLimits, u32)>,
    /// The last readiness probe, reused for a second.
    pub readiness: crate::routes::health::Readiness,
    /// The admin overview, as the background refresher last computed it.
    pub overview: crate::admin::overview::OverviewFeed,
}
