//! Live order status for server-sent events: one `LISTEN order_events` connection per api process, whose
//! changes go to the streams watching that order or that user (and to no other), and the bounds on how many
//! streams are open.
//!
//! PostgreSQL announces each status change when the transaction that makes it commits (a trigger on
//! `order_status_history`), so a change made by any worker or any api replica reaches the streams of every
//! replica. Notifications are not stored: when the listener loses its connection ([`Subscription::resync`]), or
//! a stream falls [`WATCHER_CAPACITY`] changes behind ([`Subscription::lagged`]), the stream reads what it may
//! have missed back from `order_status_history` after the last id it sent.
//!
//! The per-user bound is counted over every process in Redis ([`shared`]) as well as in each process.

pub mod shared;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use orders_core::{
    db::events::{CHANNEL, StatusChange},
    domain::{OrderId, UserId},
};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use self::shared::{Shared, SharedSlot, SharedSlots};
use crate::error::ApiError;

/// Changes buffered per stream; a stream further behind than this reads the rest from the history.
pub const WATCHER_CAPACITY: usize = 64;

/// What a stream watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// One order's changes.
    Order(OrderId),
    /// The changes of all of one user's orders.
    User(UserId),
}

/// The streams' side of the listener, and their bounds. One per process; cheap to share.
#[derive(Debug)]
pub struct Hub {
    /// Every stream, when the listener reconnected: changes may have been missed.
    resyncs: broadcast::Sender<()>,
    watchers: Mutex<Watchers>,
    open: Mutex<Open>,
    max_per_user: u32,
    max_total: u32,
    /// The per-user count over every process.
    shared: Arc<SharedSlots>,
    /// Cancelled when the process stops: every stream ends, so a graceful shutdown does not wait on them.
    pub shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct Watchers {
    next_id: u64,
    by_topic: HashMap<Topic, Vec<Watcher>>,
}

#[derive(Debug)]
struct Watcher {
    id: u64,
    changes: mpsc::Sender<Arc<StatusChange>>,
    lagged: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Open {
    total: u32,
    per_user: HashMap<UserId, u32>,
}

/// One stream's feed: the changes of its topic, a flag raised when some did not fit, and the listener's
/// reconnections. Unregisters itself when dropped.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    topic: Topic,
    id: u64,
    /// Changes of the topic, in the order PostgreSQL announced them (shared: one change may go to many streams,
    /// and a channel slot holds a pointer, not an order).
    pub changes: mpsc::Receiver<Arc<StatusChange>>,
    /// Raised when a change did not fit in `changes`: read the history.
    pub lagged: Arc<AtomicBool>,
    /// A message each time the listener reconnected: read the history.
    pub resync: broadcast::Receiver<()>,
    /// Cancelled when the server stops: the stream ends.
    pub shutdown: CancellationToken,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watchers = self
            .hub
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = watchers.by_topic.get_mut(&self.topic) {
            list.retain(|watcher| watcher.id != self.id);
            if list.is_empty() {
                watchers.by_topic.remove(&self.topic);
            }
        }
    }
}

impl Hub {
    /// A hub allowing `max_per_user` streams per user and `max_total` in all.
    ///
    /// The per-user bound is also counted over every process sharing `shared`; its leases are renewed until the
    /// hub's `shutdown`.
    pub fn new(max_per_user: u32, max_total: u32, shared: Arc<SharedSlots>) -> Arc<Self> {
        let shutdown = CancellationToken::new();
        shared.spawn_renewals(shutdown.clone());
        Arc::new(Self {
            resyncs: broadcast::channel(16).0,
            watchers: Mutex::default(),
            open: Mutex::default(),
            max_per_user,
            max_total,
            shared,
            shutdown,
        })
    }

    /// Changes of `topic` from now on.
    pub fn subscribe(self: &Arc<Self>, topic: Topic) -> Subscription {
        let (sender, changes) = mpsc::channel(WATCHER_CAPACITY);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut watchers = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
        watchers.next_id += 1;
        let id = watchers.next_id;
        watchers.by_topic.entry(topic).or_default().push(Watcher {
            id,
            changes: sender,
            lagged: lagged.clone(),
        });
        Subscription {
            hub: self.clone(),
            topic,
            id,
            changes,
            lagged,
            resync: self.resyncs.subscribe(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Hands each change to the streams of its order and of its owner, under one lock.
    fn dispatch(&self, changes: Vec<StatusChange>) {
        let watchers = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
        for change in changes.into_iter().map(Arc::new) {
            for topic in [
                Topic::Order(change.order.id),
                Topic::User(change.order.user_id),
            ] {
                for watcher in watchers.by_topic.get(&topic).into_iter().flatten() {
                    if let Err(mpsc::error::TrySendError::Full(_)) =
                        watcher.changes.try_send(change.clone())
                    {
                        watcher.lagged.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Takes a slot for a new stream of `user`, released when the slot is dropped: within this process's bounds,
    /// then within the user's bound over every process (unless Redis does not answer).
    pub async fn open(self: &Arc<Self>, user: UserId) -> Result<Slot, ApiError> {
        let mut slot = self.open_here(user)?;
        match self.shared.open(user, self.max_per_user).await {
            Shared::Granted(place) => slot.shared = Some(place),
            Shared::Refused => return Err(ApiError::TooManyStreams(self.max_per_user)),
            Shared::Unknown => {}
        }
        Ok(slot)
    }

    fn open_here(self: &Arc<Self>, user: UserId) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max_total {
            return Err(ApiError::StreamsFull);
        }
        let mine = open.per_user.entry(user).or_default();
        if *mine >= self.max_per_user {
            return Err(ApiError::TooManyStreams(self.max_per_user));
        }
        *mine += 1;
        open.total += 1;
        metrics::gauge!("sse_streams_open").set(f64::from(open.total));
        Ok(Slot {
            hub: self.clone(),
            user,
            shared: None,
        })
    }

    fn close(&self, user: UserId) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(mine) = open.per_user.get_mut(&user) {
            *mine -= 1;
            if *mine == 0 {
                open.per_user.remove(&user);
            }
        }
        metrics::gauge!("sse_streams_open").set(f64::from(open.total));
    }

    /// Starts the listener on a connection of its own (not one of the pool's), made with `options`. It runs
    /// until the hub's `shutdown`.
    pub fn spawn_listener(self: &Arc<Self>, options: PgConnectOptions) {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .connect_lazy_with(options);
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = hub.listen(pool) => {}
                () = hub.shutdown.cancelled() => {}
            }
        });
    }

    async fn listen(&self, pool: PgPool) {
        let mut first = true;
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot connect the order events listener; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(err) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %err, "cannot LISTEN for order events; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Listening (again): what was announced before is gone, so the streams read it back. The first time
            // too: a stream may have opened, and its order changed, before this listener was up.
            if !std::mem::take(&mut first) {
                tracing::info!(
                    "order events listener reconnected; streams catch up from the history"
                );
                metrics::counter!("sse_listener_reconnects_total").increment(1);
            }
            let _ = self.resyncs.send(());
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => match StatusChange::parse(notification.payload()) {
                        Ok(changes) => self.dispatch(changes),
                        Err(err) => tracing::warn!(error = %err, "unreadable order event"),
                    },
                    // sqlx reconnected and listens again, but what was announced meanwhile is gone.
                    Ok(None) => {
                        tracing::info!(
                            "order events listener reconnected; streams catch up from the history"
                        );
                        metrics::counter!("sse_listener_reconnects_total").increment(1);
                        let _ = self.resyncs.send(());
                    }
                    // It could not reconnect: start over with a new listener (which resyncs once it listens).
                    Err(err) => {
                        tracing::warn!(error = %err, "order events listener lost PostgreSQL; reconnecting");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One open stream's place in the bounds.
#[derive(Debug)]
pub struct Slot {
    hub: Arc<Hub>,
    user: UserId,
    shared: Option<SharedSlot>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.close(self.user);
    }
}
