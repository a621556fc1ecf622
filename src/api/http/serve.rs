//! The HTTP listener, with the limits `axum::serve` does not have: a deadline for each
//! request's headers (which also closes idle keep-alive sockets), a cap on open connections
//! that makes room by closing the longest-idle one (or one stalled on a client that reads
//! nothing), a deadline on write progress (a response its client does not take, over a full
//! socket or a zero HTTP/2 window, closes the connection), bounded HTTP/2 streams, the peer
//! address for the admin check, and a bounded drain on shutdown. Slow, idle or non-reading
//! clients can then never hold the sockets, buffers and file descriptors real clients need.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::error::ApiError;
use crate::config::ServerConfig;

/// One open connection, as the cap sees it.
struct Conn {
    /// Requests in flight, counting a response until its body has been sent.
    busy: Arc<AtomicUsize>,
    /// Milliseconds since the listener started when the connection last became idle.
    idle_since_ms: Arc<AtomicU64>,
    /// Asks the connection to close once its in-flight response is done (at once if idle).
    close: Arc<Notify>,
    /// Set before `close` is notified when the connection is to be dropped at once (it is
    /// stalled on its client, so a graceful close would wait for ever).
    abort: Arc<AtomicBool>,
    /// Whether, and since when, the connection waits on its client to take data.
    stall: Arc<Stall>,
}

/// "Not waiting" in the millisecond clocks below.
const NEVER: u64 = u64::MAX;

/// Since when a connection has been waiting on its client to take what it has to send: the
/// socket refusing writes, or a response body that handed over data and has not been asked
/// for more (HTTP/2 flow control: a window the client leaves at zero). A body waiting on the
/// server (a model still thinking) is not a stall.
#[derive(Default)]
struct Stall {
    /// When a write or flush to the socket last returned `Pending`, [`NEVER`] once one
    /// completes.
    io_blocked_since: AtomicU64,
    /// One clock per response body in flight (see [`BodyClock`]).
    bodies: Mutex<Vec<std::sync::Weak<AtomicU64>>>,
}

impl Stall {
    fn new() -> Self {
        Self {
            io_blocked_since: AtomicU64::new(NEVER),
            bodies: Mutex::new(Vec::new()),
        }
    }

    /// A clock for a new response body, counted as waiting on the client until it is polled.
    fn body_clock(&self, now_ms: u64) -> Arc<AtomicU64> {
        let clock = Arc::new(AtomicU64::new(now_ms));
        let mut bodies = self.bodies.lock().expect("stall lock");
        bodies.retain(|w| w.strong_count() > 0);
        bodies.push(Arc::downgrade(&clock));
        clock
    }

    /// The earliest moment something of this connection began waiting on the client.
    fn since(&self) -> Option<u64> {
        let io = self.io_blocked_since.load(Ordering::SeqCst);
        let bodies = self.bodies.lock().expect("stall lock");
        let body = bodies
            .iter()
            .filter_map(|w| w.upgrade())
            .map(|c| c.load(Ordering::SeqCst))
            .min()
            .unwrap_or(NEVER);
        Some(io.min(body)).filter(|&t| t != NEVER)
    }
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
    /// Accept it and drop this connection, stalled on a client that takes nothing.
    Abort(u64),
    /// Every connection is busy: refuse this one.
    Refuse,
}

/// A connection as the cap weighs it.
#[derive(Debug, Clone, Copy)]
struct Open {
    id: u64,
    busy: usize,
    idle_since_ms: u64,
    /// Since when it has waited on its client to take data, if it does.
    stalled_since_ms: Option<u64>,
}

/// A connection that has waited this long on its client may be dropped for a newcomer at
/// the cap: a client that reads at all takes data more often than this.
const STALL_EVICTABLE_MS: u64 = 1_000;

/// The cap's decision over the open connections: under the cap accept; at it, close the
/// connection idle the longest; with none idle, drop the one stalled longest on its client
/// (it holds the place without using it); with none of those, refuse.
fn admit(open: &[Open], max: usize, now_ms: u64) -> Admission {
    if open.len() < max {
        return Admission::Accept;
    }
    if let Some(o) = open
        .iter()
        .filter(|o| o.busy == 0)
        .min_by_key(|o| (o.idle_since_ms, o.id))
    {
        return Admission::Evict(o.id);
    }
    open.iter()
        .filter_map(|o| o.stalled_since_ms.map(|t| (t, o.id)))
        .filter(|&(t, _)| now_ms.saturating_sub(t) >= STALL_EVICTABLE_MS)
        .min()
        .map_or(Admission::Refuse, |(_, id)| Admission::Abort(id))
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

/// A response body that holds its connection's [`BusyGuard`] until it is fully sent, and
/// keeps its clock: from the moment it hands over data until hyper asks for more, it waits on
/// the client (hyper asks again as soon as the data is on its way; with HTTP/2 only once the
/// client's window has room).
struct GuardedBody {
    inner: Body,
    guard: BusyGuard,
    /// Milliseconds since the listener started when it began waiting on the client, or
    /// [`NEVER`] while it waits on the server.
    clock: Arc<AtomicU64>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let waits_on_client = matches!(polled, Poll::Ready(Some(Ok(_))));
        let at = if waits_on_client {
            self.guard.epoch.elapsed().as_millis() as u64
        } else {
            NEVER
        };
        self.clock.store(at, Ordering::SeqCst);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Most connections being answered `too_many_connections` at once; past it a newcomer is
/// closed without an answer (answering costs a TLS handshake, and a flood must not buy them).
const REFUSALS_AT_ONCE: usize = 64;

/// Serves `app` on `listener` until `shutdown` completes, then drains in-flight responses
/// (for at most `drain_seconds`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: &ServerConfig,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = Arc::new(http_builder(cfg));
    let conns = Arc::new(Conns::default());
    let epoch = Instant::now();
    let write_timeout = Duration::from_secs_f64(cfg.write_timeout_seconds);
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_AT_ONCE));
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
        let now_ms = epoch.elapsed().as_millis() as u64;
        match conns.admission(cfg.max_connections, now_ms) {
            Admission::Accept => {}
            Admission::Evict(id) => {
                tracing::debug!(
                    connection = id,
                    "at the connection cap; closing the longest-idle connection"
                );
                conns.close(id, false);
            }
            Admission::Abort(id) => {
                tracing::info!(
                    connection = id,
                    "at the connection cap; dropping a connection whose client takes nothing"
                );
                conns.close(id, true);
            }
            Admission::Refuse => {
                tracing::warn!(peer = %peer, max = cfg.max_connections, "connection refused: every connection is busy");
                if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                    let (builder, tls) = (Arc::clone(&builder), tls.clone());
                    tokio::spawn(async move {
                        refuse(stream, &builder, tls).await;
                        drop(permit);
                    });
                }
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let id = conns.next.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            busy: Arc::new(AtomicUsize::new(0)),
            idle_since_ms: Arc::new(AtomicU64::new(now_ms)),
            close: Arc::new(Notify::new()),
            abort: Arc::new(AtomicBool::new(false)),
            stall: Arc::new(Stall::new()),
        };
        let watch = Watch {
            close: Arc::clone(&conn.close),
            abort: Arc::clone(&conn.abort),
            stall: Arc::clone(&conn.stall),
            epoch,
            write_timeout,
        };
        let (busy, idle, stall) = (
            Arc::clone(&conn.busy),
            Arc::clone(&conn.idle_since_ms),
            Arc::clone(&conn.stall),
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
                _ = watch.close.notified() => false,
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
                let stall = Arc::clone(&stall);
                async move {
                    let resp = call.await.unwrap_or_else(|never| match never {});
                    let clock = stall.body_clock(epoch.elapsed().as_millis() as u64);
                    Ok::<_, std::convert::Infallible>(resp.map(|inner| GuardedBody {
                        inner,
                        guard,
                        clock,
                    }))
                }
            });
            let io_stall = Arc::clone(&watch.stall);
            match tls {
                None => {
                    let io = WatchedIo { inner: stream, stall: io_stall, epoch };
                    drive(io, &builder, service, &watch, &mut stop).await
                }
                // The handshake gets the same deadline as a request's headers.
                Some(acceptor) => match tokio::time::timeout(first_byte, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let io = WatchedIo { inner: tls_stream, stall: io_stall, epoch };
                        drive(io, &builder, service, &watch, &mut stop).await
                    }
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

/// hyper's server for both protocols, with this server's limits: HTTP/1 header deadline;
/// HTTP/2 concurrent streams, per-stream send buffer and header list bounded, and pings that
/// close a connection whose peer stopped answering.
fn http_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs_f64(cfg.header_timeout_seconds));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_streams)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Bytes an HTTP/2 stream may have queued for a client that has not opened its window.
const H2_SEND_BUFFER: usize = 64 << 10;
/// Bytes of headers one HTTP/2 request may carry (HTTP/1's limit is hyper's buffer).
const H2_MAX_HEADER_LIST: u32 = 64 << 10;

/// What a connection's task watches besides the connection itself.
struct Watch {
    close: Arc<Notify>,
    abort: Arc<AtomicBool>,
    stall: Arc<Stall>,
    epoch: Instant,
    write_timeout: Duration,
}

impl Watch {
    /// Whether the connection has waited on its client longer than the write timeout.
    fn timed_out(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.stall
            .since()
            .is_some_and(|t| now.saturating_sub(t) >= self.write_timeout.as_millis() as u64)
    }
}

/// Serves HTTP on one accepted connection (plain or TLS) until it ends: closing it gracefully
/// when the cap or a shutdown asks, dropping it when the cap aborts it or it has made no write
/// progress for the write timeout.
async fn drive<I, S, B>(
    io: I,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    watch: &Watch,
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
    // A tenth of the write timeout, so a stall is seen within 10 % of it.
    let mut tick = tokio::time::interval((watch.write_timeout / 10).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = watch.close.notified() => {
                if watch.abort.load(Ordering::SeqCst) {
                    break;
                }
                if !closing {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => {
                if watch.timed_out() {
                    tracing::info!(
                        seconds = watch.write_timeout.as_secs_f64(),
                        "closing a connection whose client took no data for server.write_timeout_seconds"
                    );
                    break;
                }
            }
        }
    }
}

/// A connection's socket (plain or TLS), noting when writes stop going through: a client that
/// does not read fills the socket, and hyper then waits on it with nothing else to show.
struct WatchedIo<I> {
    inner: I,
    stall: Arc<Stall>,
    epoch: Instant,
}

impl<I> WatchedIo<I> {
    fn note<T>(&self, polled: Poll<T>) -> Poll<T> {
        let blocked = &self.stall.io_blocked_since;
        if polled.is_pending() {
            let now = self.epoch.elapsed().as_millis() as u64;
            let _ = blocked.compare_exchange(NEVER, now, Ordering::SeqCst, Ordering::SeqCst);
        } else {
            blocked.store(NEVER, Ordering::SeqCst);
        }
        polled
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WatchedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(polled)
    }
}

impl Conns {
    fn admission(&self, max: usize, now_ms: u64) -> Admission {
        let open: Vec<Open> = self
            .map
            .lock()
            .expect("connections lock")
            .iter()
            .map(|(&id, c)| Open {
                id,
                busy: c.busy.load(Ordering::SeqCst),
                idle_since_ms: c.idle_since_ms.load(Ordering::SeqCst),
                stalled_since_ms: c.stall.since(),
            })
            .collect();
        admit(&open, max, now_ms)
    }

    /// Closes a connection (gracefully, or at once with `abort`) and stops counting it at
    /// once, so the next accept sees the room.
    fn close(&self, id: u64, abort: bool) {
        if let Some(c) = self.map.lock().expect("connections lock").remove(&id) {
            c.abort.store(abort, Ordering::SeqCst);
            c.close.notify_one();
        }
    }
}

/// How long answering a connection over the cap may take, handshake included.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// Answers a connection over the cap with an OpenAI-shaped 503 in its own protocol (TLS
/// first on an HTTPS port; HTTP/1 or HTTP/2 as the client speaks), then closes it, without
/// waiting more than [`REFUSAL_DEADLINE`] on a client that does not read.
async fn refuse(
    stream: TcpStream,
    builder: &auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
) {
    let service = hyper::service::service_fn(|_req: hyper::Request<Incoming>| async {
        let err = ApiError::Unavailable {
            message: "the server has too many open connections; retry shortly".into(),
            code: "too_many_connections",
        };
        let body = serde_json::json!({ "error": err.detail() }).to_string();
        let resp = hyper::Response::builder()
            .status(hyper::StatusCode::SERVICE_UNAVAILABLE)
            .header("content-type", "application/json")
            .header("retry-after", "1")
            .header("connection", "close")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .expect("a valid response");
        Ok::<_, std::convert::Infallible>(resp)
    });
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
        match tls {
            None => {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
            Some(acceptor) => {
                if let Ok(s) = acceptor.accept(stream).await {
                    let _ = builder.serve_connection(TokioIo::new(s), service).await;
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(id: u64, busy: usize, idle_since_ms: u64, stalled: Option<u64>) -> Open {
        Open {
            id,
            busy,
            idle_since_ms,
            stalled_since_ms: stalled,
        }
    }

    #[test]
    fn the_cap_evicts_the_longest_idle_connection_then_the_longest_stalled_or_refuses() {
        assert_eq!(admit(&[open(1, 0, 5, None)], 2, 0), Admission::Accept);
        // 2 has been idle longest; 1 is busy and never chosen while one is idle.
        let conns = [
            open(1, 1, 0, Some(0)),
            open(2, 0, 10, None),
            open(3, 0, 20, None),
        ];
        assert_eq!(admit(&conns, 3, 5_000), Admission::Evict(2));
        // All busy: the one stalled longest on its client, once stalled for a second.
        let conns = [
            open(1, 1, 0, None),
            open(2, 1, 0, Some(3_000)),
            open(3, 1, 0, Some(2_000)),
        ];
        assert_eq!(admit(&conns, 3, 5_000), Admission::Abort(3));
        assert_eq!(admit(&conns, 3, 2_500), Admission::Refuse);
        // Busy and waiting on the server (a model thinking): refused, never cut.
        let conns = [open(1, 1, 0, None), open(2, 2, 0, None)];
        assert_eq!(admit(&conns, 2, 9_000), Admission::Refuse);
    }

    #[test]
    fn a_stall_is_the_earliest_wait_on_the_client() {
        let stall = Stall::new();
        assert_eq!(stall.since(), None);
        let a = stall.body_clock(100);
        let b = stall.body_clock(50);
        assert_eq!(stall.since(), Some(50));
        b.store(NEVER, Ordering::SeqCst);
        assert_eq!(stall.since(), Some(100));
        drop(a);
        assert_eq!(stall.since(), None);
        stall.io_blocked_since.store(70, Ordering::SeqCst);
        assert_eq!(stall.since(), Some(70));
    }
}
