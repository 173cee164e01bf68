//! Accepts client connections and serves HTTP/1.1 on them within bounds, so that no client
//! can hold the daemon: at most `max_connections` at once (a permit is taken before
//! `accept`, so the others wait in the listen backlog and never take the file descriptors the
//! engine needs), hyper's header read timeout (which also closes idle keep-alive
//! connections: its clock starts whenever the connection waits for a request), tower-http's
//! request body timeout (no bytes for that long fails the request, which then releases what
//! it holds), and a write timeout on the socket (a client that reads nothing of its response
//! for that long loses its connection, and with it the buffers of its response). Shutdown is
//! hyper-util's graceful shutdown, which the caller bounds with a deadline.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tower_http::timeout::RequestBodyTimeout;

/// The bounds of client connections.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Longest wait for a whole request header, counted from the connection's opening or
    /// its last response.
    pub header_timeout: Duration,
    /// Longest pause of a request body, and of a response's writes to the socket.
    pub body_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
}

/// Raises the soft limit of open file descriptors to the hard limit where it is lower, and
/// returns the soft limit in force (`None`: unlimited).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            Err(e) => tracing::warn!(
                error = %e,
                "cannot raise the limit of open files from {:?} to {:?}",
                limit.current,
                limit.maximum
            ),
        }
    }
    limit.current
}

/// The number of connections to serve: `asked`, but at most half of the file descriptors
/// the process may open, so that the engine (cache files, the database, the store) keeps
/// the other half.
pub fn connection_limit(asked: usize, fd_limit: Option<u64>) -> usize {
    let most = fd_limit.map_or(usize::MAX, |l| {
        usize::try_from(l / 2).unwrap_or(usize::MAX).max(1)
    });
    asked.min(most)
}

/// Serves `app` on the connections of `listener` until `stop` completes, then stops
/// accepting (the listener is closed) and returns the connections still open, which the
/// caller shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    stop: impl Future<Output = ()>,
) -> GracefulShutdown {
    let permits = Arc::new(Semaphore::new(bounds.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout);
    tokio::pin!(stop);
    loop {
        // The permit is taken before `accept`: beyond the limit, clients wait in the listen
        // backlog, where they cost the daemon no file descriptor.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => {
                permit.expect("the connection semaphore is never closed")
            }
            () = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors or memory, or a connection reset before it was
                    // accepted: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(bounds.body_timeout));
        let io = TokioIo::new(Box::pin(stream));
        let service =
            TowerToHyperService::new(RequestBodyTimeout::new(app.clone(), bounds.body_timeout));
        let conn = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    graceful
}

/// The connections still open on the daemon's listeners when they stopped accepting.
pub struct Open(Vec<GracefulShutdown>);

impl Open {
    /// One listener's.
    pub fn one(a: GracefulShutdown) -> Self {
        Self(vec![a])
    }

    /// Two listeners'.
    pub fn both(a: GracefulShutdown, b: GracefulShutdown) -> Self {
        Self(vec![a, b])
    }

    /// How many connections are open.
    pub fn count(&self) -> usize {
        self.0.iter().map(GracefulShutdown::count).sum()
    }

    /// Asks every connection to close after its request in flight, and waits for them.
    pub async fn shutdown(self) {
        futures::future::join_all(self.0.into_iter().map(GracefulShutdown::shutdown)).await;
    }
}

/// A request with an empty body sent with `Expect: 100-continue` gets its answer without a
/// "100 Continue" (hyper skips it: there is nothing to send). botocore (the AWS CLI, boto3)
/// then takes the answer as a refusal of the body, and the next request it sends on that
/// connection waits for its answer until the connection times out (30 s per empty file of
/// an `aws s3 sync`). Such a connection closes after its answer. A middleware of both
/// listeners' routers.
pub async fn close_after_empty_expect(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let headers = req.headers();
    let empty_with_expect = headers
        .get(axum::http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        && headers
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    let mut response = next.run(req).await;
    if empty_with_expect {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_keep_half_the_file_descriptors_for_the_engine() {
        assert_eq!(connection_limit(1024, Some(256)), 128);
        assert_eq!(connection_limit(100, Some(256)), 100);
        assert_eq!(connection_limit(1024, None), 1024);
        assert_eq!(connection_limit(1024, Some(1)), 1);
    }
}
