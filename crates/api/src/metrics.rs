//! Request metrics and the `/metrics` endpoint (Prometheus text format).
//!
//! Series: `http_requests_total` and `http_request_duration_seconds` by method, route template and status;
//! `orders_created_total`; plus, with `--with-worker`, the worker's series.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};

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
    metrics::counter!("orders_created_total").increment(0);
}

/// Counts and times every request. The route is the matched template (`/orders/{id}`), so ids do not blow up
/// the number of series.
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(req).await;
    let labels = [
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`.
pub async fn render() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        orders_core::telemetry::prometheus().render(),
    )
}
