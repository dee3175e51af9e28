//! The listener's connections: accepting (optionally over TLS), the per-connection
//! timeouts, the connection cap, and shutdown. `api` builds the routes; this module
//! decides which connections live, and knows nothing of the routes.
//!
//! hyper is driven here directly, as `axum::serve` does, because the policy needs what
//! axum does not expose: where each connection is in its request. Each connection is in
//! one [`State`] at a time, changed by compare-and-swap, so that a decision to close one
//! (the reaper's, the cap's, shutdown's) and its own progress never both win:
//!
//! - `IDLE`: between requests, nothing of the next one read. Closed after
//!   [`Limits::keep_alive_timeout`] without a byte in either direction.
//! - `HEAD`: a request has begun (a fresh connection starts here, and a TLS handshake
//!   counts) but its head is not complete. Closed [`Limits::header_read_timeout`] after
//!   its first byte, however slowly the rest trickles in.
//! - `BUSY`: a request is in service, until its answer has been written out. Its body
//!   must keep coming: a gap of [`Limits::body_read_timeout`], or an average under
//!   [`MIN_BODY_RATE`] once the body has stalled for that long, fails it with 408.
//! - `CLOSING`: chosen to close; a request that arrives now is answered 503 with
//!   `connection: close` instead of being dropped.
//!
//! At most [`Limits::max_connections`] connections are open, below the file-descriptor
//! limit. A cap alone would let an attacker fill it, so at the cap the connections that
//! wait give way, oldest activity first: `HEAD` and `IDLE` ones, then ones still sending
//! a request body; connections whose request is whole are never closed for it. Only when
//! all are such is a new connection refused (logged, rate-limited).
//!
//! Shutdown ([`serve`]'s `shutdown` future): accepting stops; connections in `HEAD`, or
//! `BUSY` with the body still coming, are closed at once; the others finish their answer
//! (hyper's graceful shutdown closes idle ones itself) within [`Limits::grace`], after
//! which what is left is cut, with a log line that counts it. A second signal cuts at once.

use axum::body::Body;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The connection policy (server config keys of the same names, docs/configuration.md).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub grace: Duration,
}

/// File descriptors kept free beside the connections: model files, plugins, the
/// repository scans, uploads' scratch files, logs.
pub const FD_HEADROOM: u64 = 256;

/// The slowest average a request body may arrive at once it has stalled for
/// `body_read_timeout` in all: 1 KiB/s. A body trickled a byte every few seconds (each
/// gap under the timeout) fails; a slow but real upload passes.
pub const MIN_BODY_RATE: u64 = 1024;

/// The most a connection buffers of what it reads (the largest request head, too).
pub const MAX_CONNECTION_BUFFER: usize = 64 << 10;

/// Raises the soft file-descriptor limit to the hard one (a process may), and returns
/// the connections that fit below it with [`FD_HEADROOM`] to spare: the default of
/// `max_connections`, and the most it may be set to.
pub fn connections_that_fit() -> usize {
    // SAFETY: getrlimit/setrlimit on this process's own limits, with valid pointers.
    let soft = unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024 - FD_HEADROOM as usize;
        }
        // An unlimited hard limit: stop at a million, which the kernel's default
        // nr_open allows.
        let want = l.rlim_max.min(1 << 20);
        if want > l.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l.rlim_cur = want;
            }
        }
        l.rlim_cur
    };
    soft.saturating_sub(FD_HEADROOM).max(16) as usize
}

/// Where a connection is in its request (module doc).
struct State;

impl State {
    const IDLE: u8 = 0;
    const HEAD: u8 = 1;
    const BUSY: u8 = 2;
    const CLOSING: u8 = 3;
}

/// One connection, as the policy sees it.
struct Conn {
    state: AtomicU8,
    /// When the current state's clock began (ms since the table's epoch): the first byte
    /// of a head, or the end of the last answer.
    since: AtomicU64,
    /// The last byte read or written (ms since the epoch).
    last_io: AtomicU64,
    /// In `BUSY`: the request has been read whole.
    body_done: AtomicBool,
    close: Notify,
    graceful: Notify,
}

impl Conn {
    /// Moves `from` -> `to`; false when the state was not `from`.
    fn shift(&self, from: u8, to: u8) -> bool {
        self.state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks the connection closing (from whatever state it is in but `CLOSING`) and
    /// tells its task; false when it was closing already.
    fn close_now(&self) -> bool {
        if self.state.swap(State::CLOSING, Ordering::AcqRel) == State::CLOSING {
            return false;
        }
        self.close.notify_one();
        true
    }

    /// Moves to `CLOSING` only if the state is still `seen` (a decision made on `seen`
    /// must not close a connection that has moved on).
    fn close_if(&self, seen: u8) -> bool {
        if self.shift(seen, State::CLOSING) {
            self.close.notify_one();
            true
        } else {
            false
        }
    }

    /// The most recent of its clock and its last byte: an order for "waited longest".
    fn quiet_since(&self) -> u64 {
        self.since
            .load(Ordering::Acquire)
            .max(self.last_io.load(Ordering::Relaxed))
    }
}

/// Every open connection.
struct Table {
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    limits: Limits,
    /// Signalled when the last connection leaves (for shutdown).
    emptied: Notify,
    refusals: RateLimited,
}

impl Table {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Closes up to `n` connections that give way at the cap (module doc), oldest
    /// activity first; how many it closed. Batches amortise the scan when many
    /// connections are open: at the cap, 1/64 of them give way at once.
    fn evict(conns: &mut HashMap<u64, Arc<Conn>>, n: usize) -> usize {
        let mut candidates: Vec<(u8, u64, u64)> = conns
            .iter()
            .filter_map(|(&id, c)| {
                let s = c.state.load(Ordering::Acquire);
                let rank = match s {
                    State::IDLE | State::HEAD => 0,
                    State::BUSY if !c.body_done.load(Ordering::Acquire) => 1,
                    _ => return None,
                };
                Some((rank, c.quiet_since(), id))
            })
            .collect();
        let n = n.min(candidates.len());
        if n == 0 {
            return 0;
        }
        if n < candidates.len() {
            candidates.select_nth_unstable(n - 1);
        }
        let mut closed = 0;
        for &(_, _, id) in &candidates[..n] {
            if let Some(c) = conns.get(&id) {
                let seen = c.state.load(Ordering::Acquire);
                let still = matches!(seen, State::IDLE | State::HEAD)
                    || seen == State::BUSY && !c.body_done.load(Ordering::Acquire);
                if still && c.close_if(seen) {
                    conns.remove(&id);
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Closes the connection that has waited longest; false when none gives way.
    fn evict_one(&self) -> bool {
        Self::evict(&mut self.conns.lock().unwrap(), 1) > 0
    }

    /// Registers a new connection, making room at the cap (the third value says whether
    /// it closed any); `None` when no connection gives way.
    fn admit(&self) -> Option<(u64, Arc<Conn>, bool)> {
        let now = self.now();
        let mut conns = self.conns.lock().unwrap();
        let mut evicted = false;
        if conns.len() >= self.limits.max_connections {
            let batch = (self.limits.max_connections / 64).max(1);
            if Self::evict(&mut conns, batch) == 0 {
                return None;
            }
            evicted = true;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            // A fresh connection is about to send a request: it gets the header timeout.
            state: AtomicU8::new(State::HEAD),
            since: AtomicU64::new(now),
            last_io: AtomicU64::new(now),
            body_done: AtomicBool::new(true),
            close: Notify::new(),
            graceful: Notify::new(),
        });
        conns.insert(id, conn.clone());
        Some((id, conn, evicted))
    }

    fn remove(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap();
        conns.remove(&id);
        if conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Closes waiting connections past their timeouts, as of `now`.
    fn reap(&self, now: u64) {
        let (header, idle) = (
            self.limits.header_read_timeout.as_millis() as u64,
            self.limits.keep_alive_timeout.as_millis() as u64,
        );
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|_, c| {
            let seen = c.state.load(Ordering::Acquire);
            let expired = match seen {
                State::HEAD => now.saturating_sub(c.since.load(Ordering::Acquire)) > header,
                // Idle since the last answer or the last byte (an answer may still be
                // flushing after its body ended).
                State::IDLE => now.saturating_sub(c.quiet_since()) > idle,
                _ => false,
            };
            !(expired && c.close_if(seen))
        });
        if conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Shutdown's first step: closes connections in `HEAD` or still sending a body; asks
    /// the others to finish gracefully. Returns (closed, left).
    fn begin_shutdown(&self) -> (usize, usize) {
        let mut conns = self.conns.lock().unwrap();
        let mut closed = 0;
        conns.retain(|_, c| {
            let seen = c.state.load(Ordering::Acquire);
            let half_sent =
                seen == State::HEAD || seen == State::BUSY && !c.body_done.load(Ordering::Acquire);
            if half_sent && c.close_if(seen) {
                closed += 1;
                return false;
            }
            c.graceful.notify_one();
            true
        });
        (closed, conns.len())
    }

    /// Shutdown's last step: closes whatever is left; returns how many.
    fn close_all(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let n = conns.values().filter(|c| c.close_now()).count();
        conns.clear();
        self.emptied.notify_waiters();
        n
    }

    fn len(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

/// A warning logged at most once per interval, with the count of the ones held back.
struct RateLimited {
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl RateLimited {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> RateLimited {
        RateLimited {
            last: Mutex::new(None),
            held: AtomicU64::new(0),
        }
    }

    fn warn(&self, message: std::fmt::Arguments<'_>) {
        let mut last = self.last.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let held = self.held.swap(0, Ordering::Relaxed);
        if held > 0 {
            tracing::warn!("{message} ({held} more like it in the last 10 s)");
        } else {
            tracing::warn!("{message}");
        }
    }
}

/// The transport under hyper, with its reads and writes recorded on the connection.
struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
    table: Arc<Table>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.table.now();
            let c = &self.conn;
            c.last_io.store(now, Ordering::Relaxed);
            // The first byte of the next request starts its header clock (an idle
            // keep-alive connection reused after a long quiet gets the full timeout).
            if c.state.load(Ordering::Acquire) == State::IDLE {
                c.since.store(now, Ordering::Release);
                c.shift(State::IDLE, State::HEAD);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.last_io.store(self.table.now(), Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.last_io.store(self.table.now(), Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that must keep coming ([`BodyTimeout`]): no gap over the body-read
/// timeout, and once it has stalled that long in all, at least [`MIN_BODY_RATE`] on
/// average over its stalls. Time the server does not read (a handler waiting for an
/// upload slot) is not counted against the client. Records on the connection when the
/// body is whole.
struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    gap: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the current stall began, and the stalls before it.
    stalled_since: Option<Instant>,
    stalled: Duration,
    bytes: u64,
    conn: Arc<Conn>,
}

/// A request body that stopped arriving, or arrives too slowly.
#[derive(Debug)]
pub struct BodyTimeout(pub String);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyTimeout {}

impl TimedBody {
    fn too_slow(&self) -> bool {
        self.stalled > self.timeout
            && self.bytes < MIN_BODY_RATE.saturating_mul(self.stalled.as_secs().max(1))
    }
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.gap = None;
                if let Some(since) = self.stalled_since.take() {
                    self.stalled += since.elapsed();
                }
                if let Some(Ok(f)) = &frame {
                    self.bytes += f.data_ref().map_or(0, |d| d.len() as u64);
                }
                if frame.is_none() || self.inner.is_end_stream() {
                    self.conn.body_done.store(true, Ordering::Release);
                } else if self.too_slow() {
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(format!(
                        "the request body arrives at under {MIN_BODY_RATE} bytes/s ({} bytes in {} s of waiting)",
                        self.bytes,
                        self.stalled.as_secs()
                    ))))));
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if self.stalled_since.is_none() {
                    self.stalled_since = Some(Instant::now());
                }
                let timeout = self.timeout;
                let gap = self
                    .gap
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match gap.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(format!(
                        "no part of the request body arrived for {} ms (body_read_timeout_ms)",
                        timeout.as_millis()
                    )))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body that returns its connection to `IDLE` once it has been taken whole
/// (or dropped): until then the connection is `BUSY`, so a large answer to a slow reader
/// is neither evicted nor cut at shutdown before its grace.
struct AnswerBody {
    inner: Body,
    conn: Arc<Conn>,
    table: Arc<Table>,
    done: bool,
}

impl AnswerBody {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let now = self.table.now();
        self.conn.since.store(now, Ordering::Release);
        self.conn.last_io.store(now, Ordering::Relaxed);
        self.conn.shift(State::BUSY, State::IDLE);
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for AnswerBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            self.finish();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then shuts down as the module
/// doc says; `force` resolving (a second signal) cuts what is left at once. With `tls`,
/// every connection is TLS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let table = Arc::new(Table {
        epoch: Instant::now(),
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        limits: limits.clone(),
        emptied: Notify::new(),
        refusals: RateLimited::new(),
    });
    let reaper = {
        let table = table.clone();
        let tick = (limits.header_read_timeout.min(limits.keep_alive_timeout) / 4)
            .clamp(Duration::from_millis(20), Duration::from_millis(500));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                table.reap(table.now());
            }
        })
    };
    let accept_errors = RateLimited::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                accept_errors.warn(format_args!(
                    "cannot accept a connection: {e} ({} open; max_connections {})",
                    table.len(),
                    limits.max_connections
                ));
                // Out of file descriptors: the pending connection stays in the backlog.
                // Free one by closing the connection that waited longest, and let its
                // task drop the socket; otherwise wait a little instead of spinning.
                let no_fds = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                if no_fds && table.evict_one() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                continue;
            }
        };
        let Some((id, conn, evicted)) = table.admit() else {
            table.refusals.warn(format_args!(
                "refused a connection: all {} connections have a whole request in service (max_connections)",
                limits.max_connections
            ));
            drop(tcp);
            continue;
        };
        if evicted {
            // Let the evicted connections' tasks run and release their sockets before
            // the next accept: under a burst at the cap, closes must keep pace with
            // accepts or the descriptors below the limit run out.
            tokio::task::yield_now().await;
        }
        // Answers are written whole (one writev), so Nagle's algorithm can only hold one
        // back behind an unacknowledged earlier answer: turn it off.
        let _ = tcp.set_nodelay(true);
        let (app, table, tls) = (app.clone(), table.clone(), tls.clone());
        tokio::spawn(async move {
            let io = Tracked {
                inner: tcp,
                conn: conn.clone(),
                table: table.clone(),
            };
            match tls {
                None => serve_connection(io, app, conn, &table).await,
                Some(acceptor) => {
                    // The handshake is part of the first request's head (its timeout).
                    let handshake = tokio::select! {
                        r = acceptor.accept(io) => Some(r),
                        _ = conn.close.notified() => None,
                    };
                    match handshake {
                        Some(Ok(stream)) => serve_connection(stream, app, conn, &table).await,
                        Some(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        None => tracing::debug!("TLS handshake closed (timeout or the cap)"),
                    }
                }
            }
            table.remove(id);
        });
    }
    drop(listener);
    reaper.abort();
    // Seam for a later `--drain-seconds`: readiness turns false and serving goes on for
    // that long here, before connections are closed.
    let (closed, in_service) = table.begin_shutdown();
    tracing::info!(
        closed,
        in_service,
        "shutting down: closed connections without a whole request; requests in service get up to {} s",
        limits.grace.as_secs_f32()
    );
    let drained = async {
        loop {
            let emptied = table.emptied.notified();
            if table.len() == 0 {
                return;
            }
            emptied.await;
        }
    };
    let cut_why = tokio::select! {
        _ = drained => None,
        _ = tokio::time::sleep(limits.grace) => Some("after the grace period"),
        _ = force => Some("on a second signal"),
    };
    if let Some(why) = cut_why {
        let cut = table.close_all();
        if cut > 0 {
            tracing::warn!(
                "cut {cut} requests still in service {why} of {} s (--grace-seconds)",
                limits.grace.as_secs_f32()
            );
        }
    }
    Ok(())
}

/// Serves HTTP/1 on one connection until it ends, is closed by the policy, or is asked to
/// finish gracefully.
async fn serve_connection<S>(io: S, app: axum::Router, conn: Arc<Conn>, table: &Arc<Table>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body_timeout = table.limits.body_read_timeout;
    let (svc_conn, svc_table) = (conn.clone(), table.clone());
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (conn, table, app) = (svc_conn.clone(), svc_table.clone(), app.clone());
        let whole = http_body::Body::is_end_stream(req.body());
        conn.body_done.store(whole, Ordering::Release);
        // The head is complete: BUSY, unless the connection was chosen to close.
        let admitted = conn.shift(State::HEAD, State::BUSY) || conn.shift(State::IDLE, State::BUSY);
        let req = req.map(|inner| {
            Body::new(TimedBody {
                inner,
                timeout: body_timeout,
                gap: None,
                stalled_since: None,
                stalled: Duration::ZERO,
                bytes: 0,
                conn: conn.clone(),
            })
        });
        async move {
            let resp = if admitted {
                tower_service::Service::call(&mut app.clone(), req)
                    .await
                    .unwrap_or_else(|never| match never {})
            } else {
                closing_answer()
            };
            Ok::<_, std::convert::Infallible>(resp.map(|inner| AnswerBody {
                inner,
                conn,
                table,
                done: false,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The header timeout is this module's (from the first byte, see the module doc).
    builder.header_read_timeout(None);
    // hyper's read buffer may grow to ~400 KB per connection while a head is unfinished
    // (past it, 431): at 20,000 connections that is 8 GB. 64 KiB bounds it at about
    // 1.3 GB and still takes any real head (nginx allows 32 KiB).
    builder.max_buf_size(MAX_CONNECTION_BUFFER);
    let http = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(http);
    let mut graceful = false;
    loop {
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = conn.close.notified() => return,
            _ = conn.graceful.notified(), if !graceful => {
                graceful = true;
                http.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The answer to a request that arrived on a connection already chosen to close.
fn closing_answer() -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut resp = (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({
            "error": "the server is closing this connection; retry on a new one"
        })),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert("connection", axum::http::HeaderValue::from_static("close"));
    h.insert("retry-after", axum::http::HeaderValue::from_static("1"));
    resp
}

/// Loads a PEM certificate chain and private key for the listener.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "--tls-cert {}: cannot read a PEM certificate chain: {e}",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "--tls-cert {}: no certificate in the file (PEM, -----BEGIN CERTIFICATE-----)",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        anyhow::anyhow!(
            "--tls-key {}: cannot read a PEM private key: {e}",
            key.display()
        )
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key do not make a usable pair: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize) -> Table {
        Table {
            epoch: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            limits: Limits {
                header_read_timeout: Duration::from_millis(100),
                keep_alive_timeout: Duration::from_millis(200),
                body_read_timeout: Duration::from_secs(1),
                max_connections: max,
                grace: Duration::from_secs(1),
            },
            emptied: Notify::new(),
            refusals: RateLimited::new(),
        }
    }

    fn set(c: &Conn, state: u8, since: u64) {
        c.state.store(state, Ordering::Release);
        c.since.store(since, Ordering::Release);
        c.last_io.store(since, Ordering::Release);
    }

    #[test]
    fn at_the_cap_waiting_connections_give_way_then_half_sent_bodies_never_whole_requests() {
        let t = table(3);
        let (_, whole, _) = t.admit().unwrap();
        let (_, half_body, _) = t.admit().unwrap();
        let (_, waiting, _) = t.admit().unwrap();
        set(&whole, State::BUSY, 0); // the oldest, with a whole request in service
        set(&half_body, State::BUSY, 1);
        half_body.body_done.store(false, Ordering::Release);
        set(&waiting, State::IDLE, 5);
        let (_, fourth, evicted) = t.admit().expect("room is made");
        assert!(evicted);
        assert_eq!(
            waiting.state.load(Ordering::Acquire),
            State::CLOSING,
            "the waiting one first"
        );
        set(&fourth, State::BUSY, 9);
        let (_, _, _) = t.admit().expect("then the half-sent body");
        assert_eq!(half_body.state.load(Ordering::Acquire), State::CLOSING);
        assert_eq!(
            whole.state.load(Ordering::Acquire),
            State::BUSY,
            "never a whole request"
        );
        // Now every connection has a whole request or is new and busy: refused.
        for c in t.conns.lock().unwrap().values() {
            set(c, State::BUSY, 20);
        }
        assert!(t.admit().is_none());
    }

    #[test]
    fn waiting_connections_expire_by_their_timeouts_and_progress_wins_the_race() {
        let t = table(10);
        let (_, head, _) = t.admit().unwrap();
        let (_, idle, _) = t.admit().unwrap();
        let (_, busy, _) = t.admit().unwrap();
        set(&head, State::HEAD, 0);
        set(&idle, State::IDLE, 0);
        set(&busy, State::BUSY, 0);
        t.reap(150);
        assert_eq!(
            t.len(),
            2,
            "the head is closed after the header timeout (100 ms)"
        );
        assert_eq!(head.state.load(Ordering::Acquire), State::CLOSING);
        t.reap(250);
        assert_eq!(
            t.len(),
            1,
            "the idle one after the keep-alive timeout (200 ms)"
        );
        assert!(t
            .conns
            .lock()
            .unwrap()
            .values()
            .all(|c| Arc::ptr_eq(c, &busy)));
        // A connection that moved on is not closed on a decision made before.
        let (_, c, _) = t.admit().unwrap();
        set(&c, State::IDLE, 0);
        assert!(c.shift(State::IDLE, State::BUSY), "its request arrives");
        assert!(!c.close_if(State::IDLE));
        assert_eq!(c.state.load(Ordering::Acquire), State::BUSY);
    }

    #[test]
    fn shutdown_closes_what_has_no_whole_request_and_lets_the_rest_finish() {
        let t = table(10);
        let (_, head, _) = t.admit().unwrap();
        let (_, half_body, _) = t.admit().unwrap();
        set(&half_body, State::BUSY, 0);
        half_body.body_done.store(false, Ordering::Release);
        let (_, serving, _) = t.admit().unwrap();
        set(&serving, State::BUSY, 0);
        let (_, idle, _) = t.admit().unwrap();
        set(&idle, State::IDLE, 0);
        assert_eq!(
            t.begin_shutdown(),
            (2, 2),
            "idle ones close through hyper's graceful shutdown"
        );
        assert_eq!(head.state.load(Ordering::Acquire), State::CLOSING);
        assert_eq!(t.close_all(), 2);
    }

    #[test]
    fn the_fd_limit_is_raised_and_connections_fit_below_it() {
        let fit = connections_that_fit() as u64;
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads this process's limit into a valid struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        assert_eq!(l.rlim_cur, l.rlim_max.min(1 << 20));
        assert_eq!(fit, l.rlim_cur.saturating_sub(FD_HEADROOM).max(16));
    }
}
