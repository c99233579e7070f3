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

    /// Whether the last call failed.
    pub fn is_down(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
