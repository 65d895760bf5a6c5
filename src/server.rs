//! The HTTP/1.1 server loop: accept, limit, serve, drain.
//!
//! `axum::serve` exposes none of the limits a public service needs, so connections are served
//! with hyper's own builder:
//!
//! - request heads larger than `MAX_HEADER_BYTES` get 431 (hyper's default lets ~400 KB in);
//! - a head that is not complete `HEADER_READ_TIMEOUT_MS` after the connection started waiting
//!   for it closes the connection (slowloris);
//! - a connection that moves no byte for `IDLE_TIMEOUT_MS` while no request is being handled is
//!   closed (idle keep-alive, and clients that stopped reading their responses);
//! - at most `MAX_CONNECTIONS` connections are open; the next one gets a fast 503 and is closed,
//!   so memory stays bounded under a flood instead of queues growing.
//!
//! Shutdown stops accepting, lets every in-flight request finish and closes idle connections,
//! bounded by `DRAIN_TIMEOUT_MS`. A connection is never closed while a request on it is being
//! handled (before the drain timeout), which is what makes a proxy's retry on a connection error
//! safe: the request it retries never reached this process.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::Service;

use crate::Config;
use crate::metrics::Metrics;

/// What a connection over the cap gets before it is closed.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
cache-control: no-store\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 34\r\n\
\r\n\
Service Unavailable: overloaded.\r\n";

/// Turned-away connections being answered at once; beyond this they are just closed, so a
/// flood cannot pile up tasks either.
const MAX_REJECTING: usize = 256;
/// How long a turned-away client gets to read its 503.
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors), so it is not retried in a
/// busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` with `config`'s limits until `shutdown` completes, then
/// drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(config.max_header_bytes)
        // hyper's minimum buffer is 8 KiB; a bigger one is only needed for bigger heads.
        .max_buf_size(config.max_header_bytes.max(8192));
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(config.max_connections));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    tokio::pin!(shutdown);

    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.connection_rejected();
            if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    reject(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        // Responses are tiny and written whole; don't let Nagle hold them back.
        let _ = stream.set_nodelay(true);

        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            inner: stream,
            activity: activity.clone(),
        });
        let service = {
            let activity = activity.clone();
            let router = router.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let busy = activity.begin();
                let response = router.clone().call(request);
                async move {
                    let response = response.await;
                    drop(busy);
                    response
                }
            })
        };
        let connection = graceful.watch(http.serve_connection(io, service));
        let metrics = metrics.clone();
        let idle_timeout = config.idle_timeout;
        tokio::spawn(async move {
            metrics.connection(true);
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = activity.idle_for(idle_timeout) => {
                    tracing::debug!("idle connection closed");
                }
            }
            metrics.connection(false);
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("stopped accepting; draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(config.drain_timeout) => {
            tracing::warn!(timeout_ms = config.drain_timeout.as_millis() as u64, "drain timeout; closing the remaining connections");
        }
    }
}

/// Tells a connection over the cap that we are overloaded, then closes it.
async fn reject(mut stream: TcpStream) {
    let answer = async {
        stream.write_all(OVERLOADED).await?;
        stream.shutdown().await?;
        // Read (and drop) what the client still sends until it closes too: closing with unread
        // data would reset the connection, and on a real network a reset can overtake the 503.
        tokio::io::copy(&mut stream, &mut tokio::io::sink()).await
    };
    let _ = tokio::time::timeout(REJECT_LINGER, answer).await;
}

/// When a connection last moved a byte, and how many requests on it are being handled.
struct Activity {
    last_ms: AtomicU64,
    busy: AtomicUsize,
    epoch: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Completes once the connection has been idle (no bytes, no request being handled) for
    /// `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.epoch + last + limit;
            if Instant::now() < deadline {
                tokio::time::sleep_until(deadline).await;
            } else if self.busy.load(Ordering::Relaxed) == 0 {
                return;
            } else {
                // A request is being handled; its end counts as activity, so look again later.
                tokio::time::sleep(limit).await;
            }
        }
    }
}

/// Marks a request as being handled; dropping it counts as activity, so the response gets a
/// full idle period to be written.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records activity on every byte it moves. Not vectored: hyper then gathers each
/// response (head and body) into one buffer and writes it with one `poll_write`.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        // A completed read is activity; one that found the end of the stream too, harmlessly:
        // the connection closes then anyway.
        if matches!(poll, Poll::Ready(Ok(()))) {
            self.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(_))) {
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
