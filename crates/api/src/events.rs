//! Live order status for server-sent events: one `LISTEN order_events` connection per api process, fanned out
//! to every open stream of that process through a broadcast channel, and the bounds on how many streams are open.
//!
//! PostgreSQL announces each status change when the transaction that makes it commits (a trigger on
//! `order_status_history`), so a change made by any worker or any api replica reaches the streams of every
//! replica. Notifications are not stored: when the listener loses its connection, or a stream falls behind the
//! channel, the stream reads what it may have missed back from `order_status_history` after the last id it sent
//! ([`Signal::Resync`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use orders_core::{
    db::events::{CHANNEL, StatusChange},
    domain::UserId,
};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Changes buffered per stream; a stream further behind than this reads the rest from the history.
const CHANNEL_CAPACITY: usize = 1024;

/// What the listener tells the streams.
#[derive(Debug, Clone)]
pub enum Signal {
    /// A status change, as PostgreSQL announced it.
    Change(StatusChange),
    /// The listener reconnected: changes made meanwhile were not announced here, so every stream reads the
    /// history after the last change it sent.
    Resync,
}

/// The streams' side of the listener, and their bounds. One per process; cheap to share.
#[derive(Debug)]
pub struct Hub {
    signals: broadcast::Sender<Signal>,
    open: Mutex<Open>,
    max_per_user: u32,
    max_total: u32,
    /// Cancelled when the process stops: every stream ends, so a graceful shutdown does not wait on them.
    pub shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct Open {
    total: u32,
    per_user: HashMap<UserId, u32>,
}

impl Hub {
    /// A hub allowing `max_per_user` streams per user and `max_total` in all.
    pub fn new(max_per_user: u32, max_total: u32) -> Arc<Self> {
        Arc::new(Self {
            signals: broadcast::channel(CHANNEL_CAPACITY).0,
            open: Mutex::default(),
            max_per_user,
            max_total,
            shutdown: CancellationToken::new(),
        })
    }

    /// Signals from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    /// Takes a slot for a new stream of `user`, released when the slot is dropped.
    pub fn open(self: &Arc<Self>, user: UserId) -> Result<Slot, ApiError> {
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
            if !std::mem::take(&mut first) {
                // Listening again: what was announced meanwhile is gone, so the streams read it back.
                tracing::info!(
                    "order events listener reconnected; streams catch up from the history"
                );
                metrics::counter!("sse_listener_reconnects_total").increment(1);
                let _ = self.signals.send(Signal::Resync);
            }
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => match StatusChange::parse(notification.payload()) {
                        Ok(change) => {
                            let _ = self.signals.send(Signal::Change(change));
                        }
                        Err(err) => tracing::warn!(error = %err, "unreadable order event"),
                    },
                    // sqlx reconnected and listens again, but what was announced meanwhile is gone.
                    Ok(None) => {
                        tracing::info!(
                            "order events listener reconnected; streams catch up from the history"
                        );
                        metrics::counter!("sse_listener_reconnects_total").increment(1);
                        let _ = self.signals.send(Signal::Resync);
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
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.close(self.user);
    }
}
