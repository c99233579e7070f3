//! Request metrics and the `/metrics` endpoint (Prometheus text format).
//!
//! Series: `http_requests_total` and `http_request_duration_seconds` by method, route template and status;
//! `orders_created_total`, `orders_deferred_total`; the backlog gauges (`queue_jobs_waiting`, `orders_pending`,
//! `orders_oldest_pending_age_seconds`); the live-status listener's `sse_listener_reconnects_total` and
//! `sse_listener_probe_failures_total`; plus, with `--with-worker`, the worker's series.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use orders_core::queue::gauges::BacklogGauges;

/// Describes the api's series; `orders_created_total` starts at 0 so a scrape lists it from the start.
pub fn register() {
    metrics::describe_counter!(
        "http_requests_total",
        "HTTP requests, by method, route template and status"
    );
    metrics::describe_histogram!(
        "http_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP request latency, by method, route template and status"
    );
    metrics::describe_counter!(
        "orders_created_total",
        "Orders created (idempotent repeats not counted)"
    );
    metrics::describe_counter!(
        "orders_deferred_total",
        "Orders created while the queue was full or a backlog was being fed: left to the reconciler"
    );
    metrics::describe_counter!(
        "sse_listener_reconnects_total",
        "Times the order events listener listened again after losing its connection"
    );
    metrics::describe_counter!(
        "sse_listener_probe_failures_total",
        "Probes of the order events listener's connection that failed or went unanswered within 2 s"
    );
    metrics::counter!("orders_created_total").increment(0);
    metrics::counter!("orders_deferred_total").increment(0);
    metrics::counter!("sse_listener_reconnects_total").increment(0);
    metrics::counter!("sse_listener_probe_failures_total").increment(0);
}

/// Counts and times every request. Every label has a fixed set of values, whatever clients send: the method is
/// one of the standard ones or `other` (hyper accepts any token as a method), the route is the matched template
/// (`/orders/{id}`, never the raw path) or `unmatched`, and the status is one this service answers with.
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(req).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: one of nine, or `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// `GET /metrics`, with the backlog gauges sampled for it.
pub async fn render(gauges: Arc<BacklogGauges>) -> impl IntoResponse {
    gauges.refresh().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        orders_core::telemetry::prometheus().render(),
    )
}
