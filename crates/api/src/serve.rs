//! The HTTP/1.1 server: hyper's HTTP/1 connection, driven here rather than through `axum::serve`, whose
//! connections cost more memory. With 10,000 connections open on one process: 9.3 KB for a connection that has
//! sent nothing, 10.4 KB for an idle keep-alive one, 12.8 KB for an event stream (25.1 KB under `axum::serve`).
//! Most of it is hyper's two 8 KiB buffers (a page of each resident). See README, "Live status". HTTP/2 was
//! never served (axum's `http2` feature is off), so nothing is lost.
//!
//! It serves `/metrics` too. Otherwise it does what `axum::serve` did: one task per connection, the peer address
//! as `ConnectInfo`, accept errors logged and retried, and on `stop` no new connections while the open ones finish
//! what they are doing.

use std::{convert::Infallible, io, time::Duration};

use axum::{Router, body::Body, extract::ConnectInfo, http::Request, response::Response};
use futures_util::{FutureExt as _, future::BoxFuture};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Serves `router` on `listener` until `stop`, then waits for the open connections to finish.
pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    let http = hyper::server::conn::http1::Builder::new();
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
            if let Err(err) = ended {
                tracing::trace!(error = %err, %peer, "connection ended with an error");
            }
        }));
    }
    drop(listener);
    connections.shutdown().await;
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
