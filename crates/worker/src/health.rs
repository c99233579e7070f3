//! The consumer's health, as `GET /health` on the worker's metrics listener reports it, and as the
//! `worker_consumer_failing` gauge shows it.
//!
//! A consumer that fails while Redis does not answer waits for Redis like everything else, and is not unhealthy
//! for it. One that keeps failing while Redis answers is: something in the queue or in apalis-redis stops it, and
//! restarting it does not help. After [`FAILING_AFTER`] such failures in a row it is reported as failing, until
//! a consumer has run for [`HEALTHY_AFTER`] or the last failure is that old.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde::Serialize;

/// Failures in a row, with Redis answering, after which the consumer is reported as failing.
pub const FAILING_AFTER: u32 = 3;
/// How long a consumer runs, or how long ago the last failure was, before the count starts over.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// The health of one worker process's consumer. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ConsumerHealth(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// Failures in a row while Redis answered.
    failures: u32,
    last_failure: Option<Instant>,
    last_error: Option<String>,
    redis_unreachable: bool,
}

/// What `GET /health` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// `ok`, `redis_unreachable` (waiting for Redis: not a fault of the worker) or `consumer_failing`.
    pub status: &'static str,
    /// Consumer failures in a row while Redis answered.
    pub consecutive_failures: u32,
    /// The last failure's error, while it counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl HealthReport {
    /// Whether the process is healthy (`GET /health` answers 200; otherwise 503).
    pub fn healthy(&self) -> bool {
        self.status != "consumer_failing"
    }
}

impl ConsumerHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a consumer failure; `redis_answers` tells whether Redis answered a PING right after it.
    pub fn failed(&self, redis_answers: bool, error: &str) {
        let mut state = self.state();
        state.redis_unreachable = !redis_answers;
        if redis_answers {
            if state
                .last_failure
                .is_some_and(|at| at.elapsed() >= HEALTHY_AFTER)
            {
                state.failures = 0;
            }
            state.failures += 1;
            state.last_failure = Some(Instant::now());
            state.last_error = Some(error.to_owned());
        }
        Self::publish(&state);
    }

    /// Records a consumer that has run for [`HEALTHY_AFTER`]: the count starts over.
    pub fn ran_well(&self) {
        let mut state = self.state();
        *state = State::default();
        Self::publish(&state);
    }

    /// The report `GET /health` answers with.
    pub fn report(&self) -> HealthReport {
        let mut state = self.state();
        if state
            .last_failure
            .is_some_and(|at| at.elapsed() >= HEALTHY_AFTER)
        {
            state.failures = 0;
            state.last_error = None;
            Self::publish(&state);
        }
        let status = if state.failures >= FAILING_AFTER {
            "consumer_failing"
        } else if state.redis_unreachable {
            "redis_unreachable"
        } else {
            "ok"
        };
        HealthReport {
            status,
            consecutive_failures: state.failures,
            last_error: state.last_error.clone().filter(|_| state.failures > 0),
        }
    }

    fn publish(state: &State) {
        let failing = if state.failures >= FAILING_AFTER {
            1.0
        } else {
            0.0
        };
        metrics::gauge!("worker_consumer_failing").set(failing);
    }
}

#[cfg(test)]
mod tests {
    use super::{ConsumerHealth, FAILING_AFTER};

    #[test]
    fn failures_against_an_answering_redis_make_it_unhealthy_and_an_outage_does_not() {
        let health = ConsumerHealth::default();
        for _ in 0..10 {
            health.failed(false, "connection refused");
        }
        assert!(health.report().healthy());
        assert_eq!(health.report().status, "redis_unreachable");
        for _ in 0..FAILING_AFTER {
            health.failed(true, "Missing attempts in metadata");
        }
        let report = health.report();
        assert!(!report.healthy());
        assert_eq!(report.consecutive_failures, FAILING_AFTER);
        assert_eq!(
            report.last_error.as_deref(),
            Some("Missing attempts in metadata")
        );
        health.ran_well();
        assert_eq!(health.report().status, "ok");
    }
}
