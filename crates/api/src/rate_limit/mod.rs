//! Per-route rate limits (tower_governor): a burst of N, refilled at N per minute, per client.
//!
//! The client is the socket's peer address. `X-Forwarded-For` counts only when the operator says how many
//! proxies they control sit in front (`TRUST_PROXY_HOPS=N`): each appends the address it saw, so the client is
//! the Nth entry from the right, and entries to its left are whatever the client chose to send. A request with
//! fewer entries did not come through all N proxies, and counts by its peer address. IPv6 clients are keyed by
//! their /64, since one host usually owns a whole /64.

pub mod shared;

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    Json,
    body::Body,
    extract::ConnectInfo,
    http::{HeaderValue, Request, Response, StatusCode, header},
    response::IntoResponse,
};
use governor::middleware::StateInformationMiddleware;
use tower_governor::{
    GovernorError, GovernorLayer, governor::GovernorConfigBuilder, key_extractor::KeyExtractor,
};

use utoipa_axum::router::OpenApiRouter;

use crate::error::{ApiError, ErrorBody};

/// Finds the client a request counts against.
#[derive(Debug, Clone, Copy)]
pub struct ClientKey {
    /// How many trusted proxies append to `X-Forwarded-For` (0: the header is ignored).
    pub trust_proxy_hops: u8,
}

impl KeyExtractor for ClientKey {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        self.client(req).ok_or(GovernorError::UnableToExtractKey)
    }
}

impl ClientKey {
    /// The client `req` counts against (see the module's documentation).
    pub fn client<T>(&self, req: &Request<T>) -> Option<IpAddr> {
        let forwarded = forwarded_for(req.headers(), self.trust_proxy_hops);
        let peer = || {
            req.extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip())
        };
        forwarded.or_else(peer).map(bucket_of)
    }
}

/// The `hops`th address from the right of all `X-Forwarded-For` headers taken as one list (headers in order,
/// entries in order); `None` for 0 hops, a shorter list, or an entry that is not an address.
fn forwarded_for(headers: &axum::http::HeaderMap, hops: u8) -> Option<IpAddr> {
    let hops = usize::from(hops).checked_sub(1)?;
    let entry = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|value| value.to_str().unwrap_or("").rsplit(','))
        .nth(hops)?
        .trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// IPv4 as is (and IPv4-mapped IPv6 as IPv4); IPv6 by its /64.
fn bucket_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The layer type of one route's limit.
pub type RateLimitLayer = GovernorLayer<ClientKey, StateInformationMiddleware, Body>;

/// A limit of `per_minute` requests per client and minute, or `None` for 0 (no limit). Spawns the task that
/// forgets idle clients, which ends when the layer is dropped.
pub fn per_minute(per_minute: u32, key: ClientKey) -> Option<RateLimitLayer> {
    let period = Duration::from_millis(60_000 / u64::from(per_minute.max(1)));
    let config = GovernorConfigBuilder::default()
        .key_extractor(key)
        .period(period)
        .burst_size(per_minute)
        .use_headers()
        .finish()?;
    let limiter = Arc::downgrade(config.limiter());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(limiter) = limiter.upgrade() else {
                break;
            };
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    });
    Some(GovernorLayer::new(config).error_handler(too_many_requests))
}

/// Puts each route's limit on the router holding only that route (one bucket per route and client).
#[derive(Debug, Clone)]
pub struct RouteLimits {
    /// `RATE_LIMIT_ENABLED`.
    pub enabled: bool,
    /// How clients are told apart.
    pub key: ClientKey,
    /// The limits every api process shares (`RATE_LIMIT_SHARED`), decided before the per-process one.
    pub shared: Option<shared::SharedLimits>,
}

impl RouteLimits {
    /// `router` limited to `n` requests per client and minute (unchanged if limits are off or `n` is 0): by the
    /// shared limit if there is one, then by this process's own (alone when Redis cannot decide).
    pub fn apply<S: Clone + Send + Sync + 'static>(
        &self,
        router: OpenApiRouter<S>,
        route: &'static str,
        n: u32,
    ) -> OpenApiRouter<S> {
        let Some(local) = self.enabled.then(|| per_minute(n, self.key)).flatten() else {
            return router;
        };
        let router = router.layer(local);
        match &self.shared {
            Some(limits) => router.layer(axum::middleware::from_fn_with_state(
                shared::SharedRoute {
                    limits: limits.clone(),
                    route,
                    per_minute: n,
                    key: self.key,
                },
                shared::limit,
            )),
            None => router,
        }
    }
}

/// `429 {"detail": ...}` with `Retry-After` in whole seconds, at least 1.
fn too_many_requests(error: GovernorError) -> Response<Body> {
    match error {
        GovernorError::TooManyRequests { wait_time, headers } => {
            let mut response = ApiError::TooManyRequests {
                retry_after_secs: wait_time,
            }
            .into_response();
            if let Some(headers) = headers {
                response.headers_mut().extend(headers);
            }
            // governor's headers may carry its own Retry-After; ours (at least 1) wins.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait_time.max(1)));
            response
        }
        other => {
            tracing::error!(error = %other, "rate limiter could not identify the client");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(ErrorBody {
                    detail: "Internal server error".into(),
                }),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(xff: &[&str]) -> Request<()> {
        let mut builder = Request::builder();
        for value in xff {
            builder = builder.header("x-forwarded-for", *value);
        }
        let mut req = builder.body(()).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 1], 4000))));
        req
    }

    fn client(hops: u8, xff: &[&str]) -> IpAddr {
        ClientKey {
            trust_proxy_hops: hops,
        }
        .extract(&request(xff))
        .unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_peer_address_counts() {
        assert_eq!(client(0, &["1.2.3.4"]), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn behind_one_proxy_the_rightmost_entry_counts() {
        assert_eq!(client(1, &["6.6.6.6, 1.2.3.4"]), IpAddr::from([1, 2, 3, 4]));
        assert_eq!(
            client(1, &["6.6.6.6", "5.5.5.5"]),
            IpAddr::from([5, 5, 5, 5])
        );
        assert_eq!(
            client(1, &["1.2.3.4, garbage"]),
            IpAddr::from([10, 0, 0, 1])
        );
        assert_eq!(client(1, &[]), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn behind_two_proxies_the_second_entry_from_the_right_counts() {
        // forged, the client (appended by the outer proxy), the outer proxy (appended by the inner one)
        assert_eq!(
            client(2, &["6.6.6.6, 1.2.3.4, 10.1.1.1"]),
            IpAddr::from([1, 2, 3, 4])
        );
        // The same list split over two headers, and an address with a port.
        assert_eq!(
            client(2, &["6.6.6.6, 1.2.3.4:5555", "10.1.1.1"]),
            IpAddr::from([1, 2, 3, 4])
        );
        // Fewer entries than proxies: the request did not come through both, so its peer counts.
        assert_eq!(client(2, &["1.2.3.4"]), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        assert_eq!(bucket_of(a), bucket_of(b));
        let mapped: IpAddr = "::ffff:1.2.3.4".parse().unwrap();
        assert_eq!(bucket_of(mapped), IpAddr::from([1, 2, 3, 4]));
    }
}
