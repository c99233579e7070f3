//! One tracing setup for both binaries: `RUST_LOG` picks what is logged, `LOG_FORMAT` how.

use std::io::IsTerminal;

use tracing_subscriber::{
    EnvFilter, filter::Targets, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{DEFAULT_LOG_FILTER, LogConfig, LogFormat};

/// Installs the global subscriber. Call once, first thing in `main`; later calls are ignored.
///
/// A `RUST_LOG` made only of `target=level` directives (the default is one) is applied as a static [`Targets`]
/// filter. `EnvFilter`, needed only for span and field directives, takes a lock on every span enter and exit:
/// measured at about a tenth of the api's CPU on the list path.
pub fn init(config: &LogConfig) {
    let (targets, env_filter, bad_filter) = match config.rust_log.parse::<Targets>() {
        Ok(targets) => (Some(targets), None, None),
        Err(_) => match EnvFilter::try_new(&config.rust_log) {
            Ok(filter) => (None, Some(filter), None),
            Err(err) => (DEFAULT_LOG_FILTER.parse::<Targets>().ok(), None, Some(err)),
        },
    };
    let registry = tracing_subscriber::registry()
        .with(targets)
        .with(env_filter);
    // Colours only on a terminal: in a file or a log collector they are escape codes, formatted into every span.
    let ansi = std::io::stdout().is_terminal();
    // `try_init` fails only if a subscriber is already set (tests set one per binary): keep the first.
    let _ = match config.log_format {
        LogFormat::Pretty => registry.with(fmt::layer().with_ansi(ansi)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
    };
    if let Some(err) = bad_filter {
        tracing::warn!(filter = %config.rust_log, error = %err, "RUST_LOG is not a valid filter; using the default");
    }
}

/// Latency buckets in seconds, from a cache hit to a slow job.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// The process's Prometheus recorder, installed on first use. The `metrics` facade is process-global by
/// design, so the api and an in-process worker report into one registry, served at one `/metrics`.
pub fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&LATENCY_BUCKETS)
                .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will stay empty");
            }
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds histogram samples into their buckets every [`UPKEEP_INTERVAL`]. The recorder keeps every sample until
/// an upkeep or a scrape: without this, a process nobody scrapes (`METRICS_ADDR=off`) grows by each request's
/// sample forever. A thread rather than a task, so it outlives whichever runtime first asked for the recorder.
fn spawn_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the metrics upkeep thread; samples are folded on scrape only");
    }
}

/// An error with its causes, each said once. `{:#}` repeats a cause whose text its wrapper already includes:
/// sqlx's "error communicating with database: Connection refused (os error 111)" has that same io error as its
/// source.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_its_wrapper_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let err = anyhow::Error::new(sqlx::Error::Io(io)).context("cannot reach PostgreSQL");
        assert_eq!(format!("{err:#}").matches("Connection refused").count(), 2);
        assert_eq!(
            super::error_chain(&err),
            "cannot reach PostgreSQL: error communicating with database: Connection refused"
        );
    }
}
