//! A stream ends with the authority it was opened with: the access (or event-stream) token's expiry, and its
//! session. Access tokens are checked when a request arrives; a stream is one request that lasts, so the hub checks
//! its streams' authority for them:
//! - every second, the streams whose token has expired end (their clients reconnect with a fresh token and resume
//!   with `Last-Event-ID`, losing nothing);
//! - every [`SESSION_CHECK_INTERVAL`], one query asks PostgreSQL which of the open streams' sessions have ended
//!   (logged out, revoked on a refresh token's reuse, or past their end), and their streams end. Every replica
//!   asks for its own streams, so a logout on one ends the streams held on all of them within that interval.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use super::Hub;

/// How often the open streams' sessions are checked: a stream outlives the end of its session by at most this
/// (plus the query).
pub const SESSION_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often expired tokens' streams are ended: a stream outlives its token by at most this.
pub const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What a stream was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority {
    /// The session of the token, if it names one (tokens issued before sessions were named in them do not).
    pub session: Option<Uuid>,
    /// The token's expiry, in seconds since the epoch.
    pub expires_at: i64,
}

impl Authority {
    /// An authority that never ends (for tests of the hub alone).
    #[cfg(test)]
    pub const LASTING: Self = Self {
        session: None,
        expires_at: i64::MAX,
    };

    /// Whether it has expired at `now` (seconds since the epoch): a token is valid up to its `exp`.
    fn expired(&self, now: i64) -> bool {
        self.expires_at < now
    }
}

impl Hub {
    /// Ends streams as their authority ends (see the module's documentation), until the hub's shutdown.
    pub fn spawn_authority_checks(self: &Arc<Self>, db: PgPool) {
        let hub = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut expiry = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
            let mut sessions = tokio::time::interval(SESSION_CHECK_INTERVAL);
            for timer in [&mut expiry, &mut sessions] {
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = expiry.tick() => {
                        let Some(hub) = hub.upgrade() else { break };
                        hub.end_expired(Utc::now().timestamp());
                    }
                    _ = sessions.tick() => {
                        let Some(hub) = hub.upgrade() else { break };
                        hub.end_ended_sessions(&db).await;
                    }
                }
            }
        });
    }

    /// Ends the streams whose token expired before `now`.
    pub fn end_expired(&self, now: i64) -> usize {
        let ended = self.end_where(|authority| authority.expired(now));
        if ended > 0 {
            tracing::info!(streams = ended, "event streams ended: their token expired");
            metrics::counter!("sse_streams_ended_total", "reason" => "expired")
                .increment(ended as u64);
        }
        ended
    }

    /// Ends the streams whose session has ended. A database error leaves them for the next check.
    pub async fn end_ended_sessions(&self, db: &PgPool) -> usize {
        let open = self.sessions();
        if open.is_empty() {
            return 0;
        }
        let ended = match orders_core::db::sessions::ended_sessions(db, &open).await {
            Ok(ended) if ended.is_empty() => return 0,
            Ok(ended) => ended,
            Err(err) => {
                tracing::warn!(error = %err, "cannot check the sessions of open event streams; retrying");
                return 0;
            }
        };
        let count = self.end_where(|authority| {
            authority
                .session
                .is_some_and(|session| ended.binary_search(&session).is_ok())
        });
        if count > 0 {
            tracing::info!(
                streams = count,
                sessions = ended.len(),
                "event streams ended: their session ended"
            );
            metrics::counter!("sse_streams_ended_total", "reason" => "session_ended")
                .increment(count as u64);
        }
        count
    }
}
