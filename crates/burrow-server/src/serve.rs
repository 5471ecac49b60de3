//! The API's accept loop: HTTP/1.1 over hyper, with the limits that keep one client (or one
//! address) from taking the server down (the attack list's slowloris, slow POST and idle
//! connection floods; `docs/adr/0045`). Owns:
//!
//! - connection caps: in total, derived from the open-files limit with descriptors kept for the
//!   server's own work (database, sandbox sockets, disks), and per client address. A connection
//!   past a cap gets a short `503` and is closed at once, without a task or a timer;
//! - a header timeout (hyper's: it also bounds how long a kept-alive connection may sit idle
//!   between requests, since the timer starts when the connection is ready for the next request);
//! - a body timeout with a minimum rate, like Apache's `mod_reqtimeout`: a body must start within
//!   the timeout and then keep up `min_rate` bytes per second on average (each byte buys time);
//! - a cap on requests per kept-alive connection (the last answer says `Connection: close`);
//! - at most 64 KiB of request head.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// How the API bounds its clients. `from_open_files` derives the caps from the process's
/// open-files limit.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// A request's head must arrive within this (and a kept-alive connection is closed after
    /// this long idle).
    pub header_timeout: Duration,
    /// A request body must start within this, and keeps it only by sending `body_min_rate`.
    pub body_timeout: Duration,
    /// Bytes per second a body must average after `body_timeout`.
    pub body_min_rate: u64,
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one client address.
    pub max_connections_per_ip: usize,
    /// Requests on one kept-alive connection before the server closes it.
    pub max_requests_per_connection: u64,
}

/// Descriptors the server keeps for itself, beyond client connections: at least this many, or a
/// quarter of the limit.
pub const MIN_FD_RESERVE: u64 = 1024;

impl ServeLimits {
    /// Defaults for a process that may have `nofile` descriptors open.
    pub fn from_open_files(nofile: u64) -> ServeLimits {
        let reserve = (nofile / 4).max(MIN_FD_RESERVE);
        let max_connections = nofile.saturating_sub(reserve).max(16) as usize;
        ServeLimits {
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            body_min_rate: 500,
            max_connections,
            max_connections_per_ip: (max_connections / 4).max(8),
            max_requests_per_connection: 1000,
        }
    }
}

/// Raises the soft open-files limit to the hard one (allowed without privilege; raising the
/// hard limit is not, and on hosts without CAP_SYS_RESOURCE not even for root) and returns it.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Open connections, in all and per address.
#[derive(Default)]
struct Conns {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    closed: tokio::sync::Notify,
}

/// One counted connection; dropped with the socket (which an upgraded connection keeps).
struct ConnSlot {
    conns: Arc<Conns>,
    ip: IpAddr,
}

impl Conns {
    fn try_take(self: &Arc<Self>, ip: IpAddr, limits: &ServeLimits) -> Option<ConnSlot> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_default();
        if *n >= limits.max_connections_per_ip
            || self.total.load(Ordering::SeqCst) >= limits.max_connections
        {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        Some(ConnSlot {
            conns: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut per_ip = self.conns.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.conns.total.fetch_sub(1, Ordering::SeqCst);
        self.conns.closed.notify_waiters();
    }
}

/// A TCP stream that holds its connection slot for as long as it lives (through an upgrade to
/// a WebSocket too).
struct Counted {
    stream: TcpStream,
    _slot: ConnSlot,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The error a slow body ends with; the JSON extractors answer it with `408`.
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived too slowly (under {min_rate} bytes/s after {grace_s} s)")]
pub struct BodyTimeout {
    min_rate: u64,
    grace_s: u64,
}

/// A request body that must start within `grace` and then average `min_rate` bytes per second:
/// every byte received pushes the deadline out by `1 / min_rate` seconds.
struct TimedBody {
    inner: hyper::body::Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    start: tokio::time::Instant,
    grace: Duration,
    min_rate: u64,
    received: u64,
}

impl HttpBody for TimedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    let earned =
                        Duration::from_secs_f64(this.received as f64 / this.min_rate.max(1) as f64);
                    let deadline = this.start + this.grace + earned;
                    this.deadline.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout {
                    min_rate: this.min_rate,
                    grace_s: this.grace.as_secs(),
                })))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

/// Serves `app` on `listener` within `limits` until `shutdown` resolves; then stops accepting,
/// asks open connections to finish their current request, and waits a few seconds for them.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let conns = Arc::new(Conns::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    info!(
        max_connections = limits.max_connections,
        max_connections_per_ip = limits.max_connections_per_ip,
        header_timeout_s = limits.header_timeout.as_secs(),
        body_timeout_s = limits.body_timeout.as_secs(),
        body_min_rate = limits.body_min_rate,
        "serving the API"
    );
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (or a connection reset before accept): wait a moment
                // rather than spin; the connections that end give them back.
                debug!(error = %e, "accept failed");
                let out_of_fds = [nix::errno::Errno::EMFILE, nix::errno::Errno::ENFILE]
                    .iter()
                    .any(|n| e.raw_os_error() == Some(*n as i32));
                if out_of_fds {
                    warn!("out of file descriptors; pausing accepts");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let Some(slot) = conns.try_take(peer.ip(), &limits) else {
            refuse(stream, peer);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Counted {
            stream,
            _slot: slot,
        });
        tokio::spawn(serve_connection(
            io,
            app.clone(),
            limits.clone(),
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while conns.total.load(Ordering::SeqCst) > 0 {
        let closed = conns.closed.notified();
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Past a cap: a one-line `503` if the socket takes it now, then closed. Nothing waits.
fn refuse(stream: TcpStream, peer: SocketAddr) {
    debug!(%peer, "connection refused: over the connection limit");
    const BODY: &str =
        "{\"code\":\"unavailable\",\"message\":\"too many open connections; retry later\"}\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

async fn serve_connection(
    io: TokioIo<Counted>,
    app: axum::Router,
    limits: Arc<ServeLimits>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let served = Arc::new(AtomicU64::new(0));
    let svc_limits = limits.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let app = app.clone();
        let limits = svc_limits.clone();
        let n = served.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            let req = req.map(|inner| {
                let start = tokio::time::Instant::now();
                Body::new(TimedBody {
                    inner,
                    deadline: Box::pin(tokio::time::sleep_until(start + limits.body_timeout)),
                    start,
                    grace: limits.body_timeout,
                    min_rate: limits.body_min_rate,
                    received: 0,
                })
            });
            let mut resp: Response<Body> = tower::ServiceExt::oneshot(app, req).await?;
            // The last request a kept-alive connection may make, or one whose body came too
            // slowly (the rest of it is not worth waiting for): the connection closes after it.
            if n >= limits.max_requests_per_connection
                || resp.status() == axum::http::StatusCode::REQUEST_TIMEOUT
            {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_keep_descriptors_for_the_server_and_share_them_among_addresses() {
        // This machine: 20,000 descriptors, a quarter kept.
        let l = ServeLimits::from_open_files(20_000);
        assert_eq!(
            (l.max_connections, l.max_connections_per_ip),
            (15_000, 3_750)
        );
        // A small limit still keeps 1024 for the server.
        let l = ServeLimits::from_open_files(2048);
        assert_eq!(l.max_connections, 1024);
        // Never nothing.
        assert!(ServeLimits::from_open_files(100).max_connections >= 16);
    }

    #[test]
    fn a_connection_past_either_cap_is_refused_and_its_slot_comes_back() {
        let mut l = ServeLimits::from_open_files(20_000);
        l.max_connections = 3;
        l.max_connections_per_ip = 2;
        let conns = Arc::new(Conns::default());
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let a1 = conns.try_take(a, &l).unwrap();
        let _a2 = conns.try_take(a, &l).unwrap();
        assert!(conns.try_take(a, &l).is_none(), "per-address cap");
        let _b1 = conns.try_take(b, &l).unwrap();
        assert!(conns.try_take(b, &l).is_none(), "total cap");
        drop(a1);
        assert!(
            conns.try_take(b, &l).is_some(),
            "a closed connection frees its slot"
        );
    }
}
