//! The HTTP listener, with the limits `axum::serve` does not have: a deadline for each
//! request's headers (which also closes idle keep-alive sockets), a cap on open connections
//! that makes room by closing the longest-idle one, the peer address for the admin check, and
//! a bounded drain on shutdown. Slow or idle clients can then never hold the sockets and file
//! descriptors that real clients need.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::error::ApiError;
use crate::config::ServerConfig;

/// One open connection, as the cap sees it.
struct Conn {
    /// Requests in flight, counting a response until its body has been sent.
    busy: Arc<AtomicUsize>,
    /// Milliseconds since the listener started when the connection last became idle.
    idle_since_ms: Arc<AtomicU64>,
    /// Asks the connection to close once its in-flight response is done (at once if idle).
    close: Arc<Notify>,
}

/// Every open connection.
#[derive(Default)]
struct Conns {
    map: Mutex<HashMap<u64, Conn>>,
    next: AtomicU64,
}

/// What to do with a connection accepted at the cap.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Accept,
    /// Accept it and close this idle connection to make room.
    Evict(u64),
    /// Every connection is busy: refuse this one.
    Refuse,
}

/// The cap's decision over `(id, busy, idle_since_ms)` of the open connections: under the cap
/// accept; at it, evict the connection idle the longest; with none idle, refuse.
fn admit(open: &[(u64, usize, u64)], max: usize) -> Admission {
    if open.len() < max {
        return Admission::Accept;
    }
    open.iter()
        .filter(|&&(_, busy, _)| busy == 0)
        .min_by_key(|&&(id, _, since)| (since, id))
        .map_or(Admission::Refuse, |&(id, _, _)| Admission::Evict(id))
}

/// Keeps a connection marked busy while a response is being produced and sent.
struct BusyGuard {
    busy: Arc<AtomicUsize>,
    idle_since_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl BusyGuard {
    fn new(busy: Arc<AtomicUsize>, idle_since_ms: Arc<AtomicU64>, epoch: Instant) -> Self {
        busy.fetch_add(1, Ordering::SeqCst);
        Self {
            busy,
            idle_since_ms,
            epoch,
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if self.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            let now = self.epoch.elapsed().as_millis() as u64;
            self.idle_since_ms.store(now, Ordering::SeqCst);
        }
    }
}

/// A response body that holds its connection's [`BusyGuard`] until it is fully sent.
struct GuardedBody {
    inner: Body,
    _guard: BusyGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then drains in-flight responses
/// (for at most `drain_seconds`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: &ServerConfig,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs_f64(cfg.header_timeout_seconds));
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let conns = Arc::new(Conns::default());
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, never spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        match conns.admission(cfg.max_connections) {
            Admission::Accept => {}
            Admission::Evict(id) => {
                tracing::debug!(
                    connection = id,
                    "at the connection cap; closing the longest-idle connection"
                );
                conns.close(id);
            }
            Admission::Refuse => {
                tracing::warn!(peer = %peer, max = cfg.max_connections, "connection refused: every connection is busy");
                tokio::spawn(refuse(stream));
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let id = conns.next.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            busy: Arc::new(AtomicUsize::new(0)),
            idle_since_ms: Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64)),
            close: Arc::new(Notify::new()),
        };
        let (busy, idle, close) = (
            Arc::clone(&conn.busy),
            Arc::clone(&conn.idle_since_ms),
            Arc::clone(&conn.close),
        );
        conns.map.lock().expect("connections lock").insert(id, conn);
        let (app, builder, conns, mut stop) = (
            app.clone(),
            Arc::clone(&builder),
            Arc::clone(&conns),
            stop_rx.clone(),
        );
        let first_byte = Duration::from_secs_f64(cfg.header_timeout_seconds);
        let tls = tls.clone();
        tasks.spawn(async move {
            // The protocol sniffing below waits for the first bytes before HTTP/1's header
            // timer starts, so a socket that never sends anything is timed here.
            // (`readable()` may wake spuriously; `peek` waits for a real byte or the end.)
            let mut probe = [0u8; 1];
            let first = tokio::select! {
                r = tokio::time::timeout(first_byte, stream.peek(&mut probe)) => matches!(r, Ok(Ok(1))),
                _ = close.notified() => false,
                _ = stop.changed() => false,
            };
            if !first {
                conns.map.lock().expect("connections lock").remove(&id);
                return;
            }
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let guard = BusyGuard::new(Arc::clone(&busy), Arc::clone(&idle), epoch);
                let call = app.clone().oneshot(req.map(Body::new));
                async move {
                    let resp = call.await.unwrap_or_else(|never| match never {});
                    Ok::<_, std::convert::Infallible>(resp.map(|inner| GuardedBody {
                        inner,
                        _guard: guard,
                    }))
                }
            });
            match tls {
                None => drive(stream, &builder, service, &close, &mut stop).await,
                // The handshake gets the same deadline as a request's headers.
                Some(acceptor) => match tokio::time::timeout(first_byte, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => drive(tls_stream, &builder, service, &close, &mut stop).await,
                    Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                },
            }
            conns.map.lock().expect("connections lock").remove(&id);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs_f64(cfg.drain_seconds), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "responses still in flight after server.drain_seconds; closing them"
        );
        tasks.abort_all();
    }
    Ok(())
}

/// Serves HTTP on one accepted connection (plain or TLS) until it ends, closing it
/// gracefully when the cap or a shutdown asks.
async fn drive<I, S, B>(
    io: I,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    close: &Notify,
    stop: &mut watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = close.notified(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

impl Conns {
    fn admission(&self, max: usize) -> Admission {
        let open: Vec<(u64, usize, u64)> = self
            .map
            .lock()
            .expect("connections lock")
            .iter()
            .map(|(&id, c)| {
                (
                    id,
                    c.busy.load(Ordering::SeqCst),
                    c.idle_since_ms.load(Ordering::SeqCst),
                )
            })
            .collect();
        admit(&open, max)
    }

    /// Closes a connection and stops counting it at once, so the next accept sees the room.
    fn close(&self, id: u64) {
        if let Some(c) = self.map.lock().expect("connections lock").remove(&id) {
            c.close.notify_one();
        }
    }
}

/// Answers a connection over the cap with an OpenAI-shaped 503 and closes it, without
/// waiting on a client that does not read.
async fn refuse(mut stream: TcpStream) {
    let err = ApiError::Unavailable {
        message: "the server has too many open connections; retry shortly".into(),
        code: "too_many_connections",
    };
    let body = serde_json::json!({ "error": err.detail() }).to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_evicts_the_longest_idle_connection_or_refuses() {
        assert_eq!(admit(&[(1, 0, 5)], 2), Admission::Accept);
        // (id, busy, idle since): 2 has been idle longest; 1 is busy and never chosen.
        let open = [(1, 1, 0), (2, 0, 10), (3, 0, 20)];
        assert_eq!(admit(&open, 3), Admission::Evict(2));
        assert_eq!(admit(&[(1, 1, 0), (2, 2, 0)], 2), Admission::Refuse);
    }
}
