//! One log line per Redis outage, not one per failed call: the consumer loop, the reconciler and the janitor
//! all fail together while Redis is down, every round. The first failure is a warning, the recovery an info
//! line, and the failures in between are debug lines.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// Whether Redis is known to be down, shared by everything of one worker process that talks to it.
#[derive(Debug, Clone, Default)]
pub struct RedisOutage(Arc<AtomicBool>);

impl RedisOutage {
    /// Records a failed call: a warning if Redis was thought to be up, a debug line otherwise.
    pub fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        if self.0.swap(true, Ordering::Relaxed) {
            tracing::debug!(%error, "{what} failed: Redis still unreachable");
        } else {
            tracing::warn!(%error, "Redis unreachable ({what} failed); retrying until it answers (check REDIS_URL)");
        }
    }

    /// Records a call that worked: an info line if Redis was down.
    pub fn succeeded(&self) {
        if self.0.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis answers again");
        }
    }

    /// Records a failed Redis call: through [`Self::failed`] if Redis did not answer, as a warning of its own if it
    /// answered with an error (a script refused, a key of another type), which says nothing about its being up.
    pub fn redis_failed(&self, what: &str, error: &redis::RedisError) {
        if unreachable(error) {
            self.failed(what, error);
        } else {
            self.succeeded();
            tracing::warn!(%error, "{what} failed although Redis answers; retrying next round");
        }
    }

    /// Whether the last call failed.
    pub fn is_down(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Whether `error` means Redis did not answer (rather than answered with an error).
pub fn unreachable(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
}
