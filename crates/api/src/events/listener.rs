//! The listener: `LISTEN order_events` on a connection of its own, which it proves alive and replaces when it is
//! not.
//!
//! A connection can die without either end being told: a NAT or a firewall forgets it, a failover moves the
//! server's address. Nothing is ever read from it again, while the streams' heartbeats make the process look
//! healthy. sqlx sets no TCP keepalive and `PgListener` waits without a deadline, so every [`PROBE_INTERVAL`] the
//! listener sends its `LISTEN` again on that same connection (a no-op on a channel it listens on, and a round
//! trip to the backend that holds its subscription); an answer that does not come within [`PROBE_DEADLINE`]
//! counts as a lost connection. A lost connection is dropped, a new one listens, and the streams catch up from the
//! history (see [`super::Signal::CatchUp`]).
//!
//! Each connection is made in a one-connection pool of its own: dropping a `PgListener` sends `UNLISTEN *` from a
//! task of sqlx's, which on a silent connection waits until the operating system gives up on the socket, and the
//! next connection must not queue behind it.
//!
//! `GET /health/ready` reports the listener down once nothing has proved it listening for
//! [`LISTENER_DOWN_AFTER`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use orders_core::db::events::{CHANNEL, StatusChange};
use sqlx::{
    Executor as _,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::time::{Instant, MissedTickBehavior};

use super::Hub;

/// How often the listener's connection is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(3);

/// How long a probe waits for its answer before the connection counts as lost. A round trip to an idle backend
/// takes milliseconds; two seconds leave room for a busy server without keeping the streams deaf for long.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// How long connecting and the first `LISTEN` may take before the attempt is given up and made again.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(5);

/// How long the listener may go without proof that it listens before readiness fails. A silent connection is
/// found within [`PROBE_INTERVAL`] + [`PROBE_DEADLINE`] (5 s) of its last answer and replaced in milliseconds, so
/// twice that is no passing fault: the listener cannot reach PostgreSQL, and this process's streams hear nothing.
pub const LISTENER_DOWN_AFTER: Duration = Duration::from_secs(10);

/// Pause after a failed attempt to connect.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The probe: the listener's own `LISTEN`, again.
const PROBE: &str = r#"LISTEN "order_events""#;

/// When the listener was last known to listen, for readiness.
#[derive(Debug)]
pub struct ListenerHealth {
    /// When this process started listening, or trying to.
    since: Instant,
    /// Milliseconds after `since` of the last proof: a `LISTEN` answered, or a notification received.
    listening_at_ms: AtomicU64,
}

impl Default for ListenerHealth {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            listening_at_ms: AtomicU64::new(0),
        }
    }
}

impl ListenerHealth {
    /// Records that the listener listens now.
    fn listening(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.listening_at_ms.store(now, Ordering::Relaxed);
    }

    /// How long since the listener was last known to listen (since the start, if it never has).
    pub fn unheard_for(&self) -> Duration {
        let last = Duration::from_millis(self.listening_at_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }

    /// Whether it has been unheard of for longer than [`LISTENER_DOWN_AFTER`].
    pub fn is_down(&self) -> bool {
        self.unheard_for() > LISTENER_DOWN_AFTER
    }
}

/// Why the listener stopped listening on a connection.
enum Lost {
    /// PostgreSQL or the network closed it.
    Closed,
    /// It failed a read or a probe.
    Failed(sqlx::Error),
    /// A probe went unanswered for [`PROBE_DEADLINE`].
    Silent,
}

impl Hub {
    /// Starts the listener on a connection of its own (not one of the pool's), made with `options`. It runs
    /// until the hub's `shutdown`.
    pub fn spawn_listener(self: &Arc<Self>, options: PgConnectOptions) {
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = hub.listen(options) => {}
                () = hub.shutdown.cancelled() => {}
            }
        });
    }

    /// Listens on one connection after another, forever.
    async fn listen(&self, options: PgConnectOptions) {
        let mut first = true;
        loop {
            let mut listener = match tokio::time::timeout(CONNECT_DEADLINE, connect(&options)).await
            {
                Ok(Ok(listener)) => listener,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "cannot LISTEN for order events; retrying in {RETRY_AFTER:?}");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(
                        "no answer from PostgreSQL to the order events listener within {CONNECT_DEADLINE:?}; retrying"
                    );
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            };
            self.listener.listening();
            // Listening (again): what was announced before is gone, so the streams read it back. The first time
            // too: a stream may have opened, and its order changed, before this listener was up.
            if !std::mem::take(&mut first) {
                tracing::info!(
                    "order events listener reconnected; streams catch up from the history"
                );
                metrics::counter!("sse_listener_reconnects_total").increment(1);
            }
            self.catch_up_all();
            match self.relay(&mut listener).await {
                Lost::Closed => tracing::warn!("order events listener lost its connection"),
                Lost::Failed(err) => {
                    tracing::warn!(error = %err, "order events listener lost its connection");
                }
                Lost::Silent => tracing::warn!(
                    "order events listener's connection did not answer a probe within {PROBE_DEADLINE:?}; replacing it"
                ),
            }
        }
    }

    /// Hands each notification to the streams, and probes the connection every [`PROBE_INTERVAL`], until the
    /// connection is lost or fails a probe.
    async fn relay(&self, listener: &mut PgListener) -> Lost {
        let mut probes = tokio::time::interval_at(Instant::now() + PROBE_INTERVAL, PROBE_INTERVAL);
        probes.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // Waiting for a notification may be cut short by the probe: sqlx reads a message whole or not at all,
            // and a notification that comes during the probe is kept for the next wait.
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => {
                        self.listener.listening();
                        match StatusChange::parse(notification.payload()) {
                            Ok(changes) => self.dispatch(changes),
                            Err(err) => tracing::warn!(error = %err, "unreadable order event"),
                        }
                    }
                    Ok(None) => return Lost::Closed,
                    Err(err) => return Lost::Failed(err),
                },
                _ = probes.tick() => {
                    match tokio::time::timeout(PROBE_DEADLINE, listener.execute(PROBE)).await {
                        Ok(Ok(_)) => self.listener.listening(),
                        Ok(Err(err)) => {
                            metrics::counter!("sse_listener_probe_failures_total").increment(1);
                            return Lost::Failed(err);
                        }
                        Err(_) => {
                            metrics::counter!("sse_listener_probe_failures_total").increment(1);
                            return Lost::Silent;
                        }
                    }
                }
            }
        }
    }
}

/// A new connection that listens on [`CHANNEL`], in a pool of its own.
async fn connect(options: &PgConnectOptions) -> sqlx::Result<PgListener> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(CONNECT_DEADLINE)
        .connect_lazy_with(options.clone());
    let mut listener = PgListener::connect_with(&pool).await?;
    // A lost connection is reported at once, and replaced here, under a deadline: sqlx would reconnect without one.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_listens_on_the_channel_the_listener_listens_on() {
        assert_eq!(PROBE, format!(r#"LISTEN "{CHANNEL}""#));
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_unheard_of_for_longer_than_the_bound_is_down() {
        let health = ListenerHealth::default();
        tokio::time::advance(LISTENER_DOWN_AFTER).await;
        assert!(!health.is_down(), "starting, within the bound");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(health.is_down(), "never listened");
        health.listening();
        assert_eq!(health.unheard_for(), Duration::ZERO);
        assert!(!health.is_down());
        tokio::time::advance(LISTENER_DOWN_AFTER + Duration::from_millis(1)).await;
        assert!(health.is_down());
    }
}
