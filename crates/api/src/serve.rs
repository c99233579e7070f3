//! The HTTP/1.1 server: hyper's HTTP/1 connection, driven here rather than through `axum::serve`, whose
//! connections cost more memory. With 10,000 connections open on one process: 9.3 KB for a connection that has
//! sent nothing, 10.4 KB for an idle keep-alive one, 12.8 KB for an event stream (25.1 KB under `axum::serve`).
//! Most of it is hyper's two 8 KiB buffers (a page of each resident). See README, "Live status". HTTP/2 was
//! never served (axum's `http2` feature is off), so nothing is lost.
//!
//! It serves `/metrics` too. Otherwise it does what `axum::serve` did: one task per connection, the peer address
//! as `ConnectInfo`, accept errors logged and retried, and on `stop` no new connections while the open ones finish
//! what they are doing.
//!
//! Two things `axum::serve` does not do bound what clients can hold ([`Limits`]):
//! - A connection has [`Limits::header_timeout`] to send a request's head, counted from its start or from the end
//!   of its previous response: one that sends half a request line and stops, or sits idle between keep-alive
//!   requests, is closed then. An event stream is not affected: its request was read long ago.
//! - At most [`Limits::max_connections`] are open at once. One more is answered `503` with `Retry-After` and
//!   closed, without reading its request, so that the process never runs out of file descriptors: once `accept`
//!   fails for want of one, every route stops, the health checks included.

use std::{
    convert::Infallible,
    io,
    sync::{Arc, LazyLock},
    time::Duration,
};

use axum::{Router, body::Body, extract::ConnectInfo, http::Request, response::Response};
use futures_util::{FutureExt as _, future::BoxFuture};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// What one listener's clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a request's head, from the connection's start or the end of its previous response.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// How long a refused connection is given to take its `503` before it is closed anyway.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Refused connections being answered at once; past it, a connection is closed without an answer, so that a
/// flood of them cannot hold the file descriptors the limit keeps free.
const REFUSALS_AT_ONCE: usize = 256;

/// What a connection past [`Limits::max_connections`] reads before it is closed, in the contract's error shape.
static REFUSAL: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = r#"{"detail":"Too many connections; retry in a second"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Serves `router` on `listener` until `stop`, then waits for the open connections to finish.
pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken, limits: Limits) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let connections = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                if !is_per_connection(&err) {
                    // Out of file descriptors, say: the next accept would fail the same way at once.
                    tracing::warn!(error = %err, "cannot accept connections; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            metrics::counter!("http_connections_refused_total").increment(1);
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                tokio::spawn(refuse(stream).map(move |()| drop(refusal)));
            }
            continue;
        };
        metrics::gauge!("http_connections_open").increment(1.0);
        let router = router.clone();
        // Each request's future is boxed: hyper keeps a slot of that future's size for as long as the
        // connection is open (an event stream's connection, for hours), not only while a request is handled.
        let service = service_fn(move |mut request: Request<Incoming>| -> BoxFuture<'static, Result<Response, Infallible>> {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(Body::new)).boxed()
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        // Spawned as it is, not in an `async` block: one would hold a second copy of the connection's state.
        tokio::spawn(connection.map(move |ended| {
            drop(slot);
            metrics::gauge!("http_connections_open").decrement(1.0);
            if let Err(err) = ended {
                tracing::trace!(error = %err, %peer, "connection ended with an error");
            }
        }));
    }
    drop(listener);
    connections.shutdown().await;
}

/// Answers a connection past the limit with [`REFUSAL`] and closes it, all within [`REFUSAL_LINGER`]. The request's
/// head is read first: an HTTP client takes an answer that comes before its request for a broken connection. Then
/// whatever else the client sends is read and dropped until it closes: closing a socket with unread data resets
/// it, and the client could lose the answer.
async fn refuse(mut stream: TcpStream) {
    let answered = async {
        let mut head = Vec::new();
        let mut chunk = [0; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            head.extend_from_slice(&chunk[..read]);
        }
        stream.write_all(&REFUSAL).await?;
        stream.shutdown().await?;
        while stream.read(&mut chunk).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answered).await;
}

/// An accept error that concerns one connection only (its client gave up before it was accepted).
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
