//! The listener's connections: accepting (optionally over TLS), the per-connection
//! timeouts, the connection cap, and shutdown. `api` builds the routes; this module
//! decides which connections live, and knows nothing of the routes.
//!
//! hyper is driven here directly, as `axum::serve` does, because the policy needs what
//! axum does not expose: where each connection is in its request.
//!
//! - A connection *waits* between requests: from its accept, and from the end of each
//!   answer. A waiting connection that has sent part of a request gets
//!   [`Limits::header_read_timeout`] from the start of the wait to complete its headers
//!   (a slow trickle does not extend it); one that has sent nothing (a fresh connection
//!   counts as having sent part of one) is closed after [`Limits::keep_alive_timeout`]
//!   of silence.
//! - A request's body must keep coming: a gap of [`Limits::body_read_timeout`] between
//!   two parts fails it (408) and the connection closes.
//! - At most [`Limits::max_connections`] connections are open, below the file-descriptor
//!   limit. A cap alone would let an attacker fill it, so at the cap the oldest waiting
//!   connection (one that has not completed its request headers, or an idle keep-alive
//!   one) is closed to admit the new one; connections with a request in service are never
//!   closed for it. Only when every connection is busy is a new one refused (logged,
//!   rate-limited).
//! - Shutdown ([`serve`]'s `shutdown` future): accepting stops; waiting connections and
//!   those still sending a request are closed at once; requests in service get up to
//!   [`Limits::grace`] and are then cut, with a log line that counts them.

use axum::body::Body;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// One connection's place in its request, as the policy needs it.
struct Conn {
    /// When the connection began waiting for a request (ms since the table's epoch).
    wait_started: AtomicU64,
    /// The last byte read or written (ms since the epoch).
    last_io: AtomicU64,
    /// A request is in service (its headers are complete).
    busy: AtomicBool,
    /// Bytes arrived since the wait began: a request is on its way.
    read_while_waiting: AtomicBool,
    /// The request in service has been read whole.
    body_done: AtomicBool,
    /// Requests answered on this connection.
    served: AtomicU64,
    close: Notify,
    graceful: Notify,
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

    /// Closes the oldest waiting connection (oldest wait first); false when none waits.
    fn evict_oldest_waiting(&self) -> bool {
        let mut conns = self.conns.lock().unwrap();
        Self::evict_in(&mut conns)
    }

    fn evict_in(conns: &mut HashMap<u64, Arc<Conn>>) -> bool {
        let oldest = conns
            .iter()
            .filter(|(_, c)| !c.busy.load(Ordering::Relaxed))
            .min_by_key(|(_, c)| c.wait_started.load(Ordering::Relaxed))
            .map(|(&id, _)| id);
        match oldest.and_then(|id| conns.remove(&id)) {
            Some(evicted) => {
                evicted.close.notify_one();
                true
            }
            None => false,
        }
    }

    /// Registers a new connection, making room at the cap by closing the oldest waiting
    /// one (the third value says whether it did); `None` when every connection is busy.
    fn admit(&self) -> Option<(u64, Arc<Conn>, bool)> {
        let now = self.now();
        let mut conns = self.conns.lock().unwrap();
        let mut evicted = false;
        if conns.len() >= self.limits.max_connections {
            if !Self::evict_in(&mut conns) {
                return None;
            }
            evicted = true;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            wait_started: AtomicU64::new(now),
            last_io: AtomicU64::new(now),
            busy: AtomicBool::new(false),
            // A fresh connection is about to send a request: it gets the header timeout.
            read_while_waiting: AtomicBool::new(true),
            body_done: AtomicBool::new(true),
            served: AtomicU64::new(0),
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

    /// Closes waiting connections past their timeouts.
    fn reap(&self) {
        let now = self.now();
        let (header, idle) = (
            self.limits.header_read_timeout.as_millis() as u64,
            self.limits.keep_alive_timeout.as_millis() as u64,
        );
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|_, c| {
            if c.busy.load(Ordering::Relaxed) {
                return true;
            }
            let expired = if c.read_while_waiting.load(Ordering::Relaxed) {
                now.saturating_sub(c.wait_started.load(Ordering::Relaxed)) > header
            } else {
                // Idle since the last answer: counted from the last byte written, so an
                // answer still being sent is not idle.
                let since = c
                    .wait_started
                    .load(Ordering::Relaxed)
                    .max(c.last_io.load(Ordering::Relaxed));
                now.saturating_sub(since) > idle
            };
            if expired {
                c.close.notify_one();
            }
            !expired
        });
        if conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Shutdown's first step: closes connections that wait or are still sending their
    /// request; asks the others to close after their answer. Returns how many are left.
    fn begin_shutdown(&self) -> (usize, usize) {
        let mut conns = self.conns.lock().unwrap();
        let mut closed = 0;
        conns.retain(|_, c| {
            let in_service = c.busy.load(Ordering::Relaxed) && c.body_done.load(Ordering::Relaxed);
            if in_service {
                c.graceful.notify_one();
            } else {
                c.close.notify_one();
                closed += 1;
            }
            in_service
        });
        (closed, conns.len())
    }

    /// Shutdown's last step: closes whatever is left; returns how many.
    fn close_all(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let n = conns.len();
        for c in conns.values() {
            c.close.notify_one();
        }
        conns.clear();
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
            if !c.busy.load(Ordering::Relaxed) {
                c.read_while_waiting.store(true, Ordering::Relaxed);
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

/// A request body whose parts must keep coming: a gap longer than the body-read
/// timeout is an error ([`BodyTimeout`]). Records on the connection when it is whole.
struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    gap: Option<Pin<Box<tokio::time::Sleep>>>,
    conn: Arc<Conn>,
}

/// A request body stalled for longer than `body_read_timeout_ms`.
#[derive(Debug)]
pub struct BodyTimeout(pub Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no part of the request body arrived for {} ms (body_read_timeout_ms)",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyTimeout {}

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
                if frame.is_none() || self.inner.is_end_stream() {
                    self.conn.body_done.store(true, Ordering::Relaxed);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let gap = self
                    .gap
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match gap.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
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

/// Serves `app` on `listener` until `shutdown` resolves, then shuts down as the module
/// doc says. With `tls`, every connection is TLS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
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
                table.reap();
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
                // Out of file descriptors (EMFILE) or the like: the pending connection
                // stays in the backlog. Free one by closing the oldest waiting
                // connection and let its task drop the socket; when none waits, wait a
                // little instead of spinning on the error.
                accept_errors.warn(format_args!(
                    "cannot accept a connection: {e} ({} open; max_connections {})",
                    table.len(),
                    limits.max_connections
                ));
                if table.evict_oldest_waiting() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                continue;
            }
        };
        let Some((id, conn, evicted)) = table.admit() else {
            table.refusals.warn(format_args!(
                "refused a connection: all {} connections have a request in service (max_connections)",
                limits.max_connections
            ));
            drop(tcp);
            continue;
        };
        if evicted {
            // Let the evicted connection's task run and release its socket before the
            // next accept: under a burst at the cap, closes must keep pace with accepts
            // or the descriptors below the limit run out.
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
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(table.limits.header_read_timeout, acceptor.accept(io)) => r,
                        _ = conn.close.notified() => Ok(Err(std::io::ErrorKind::ConnectionAborted.into())),
                    };
                    match handshake {
                        Ok(Ok(stream)) => serve_connection(stream, app, conn, &table).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
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
        "shutting down: closed waiting and half-sent connections; requests in service get up to {} s",
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
    if tokio::time::timeout(limits.grace, drained).await.is_err() {
        let cut = table.close_all();
        if cut > 0 {
            tracing::warn!(
                "cut {cut} requests still in service after the grace period of {} s (--grace-seconds)",
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
        conn.busy.store(true, Ordering::Relaxed);
        conn.body_done.store(
            http_body::Body::is_end_stream(req.body()),
            Ordering::Relaxed,
        );
        let req = req.map(|inner| {
            Body::new(TimedBody {
                inner,
                timeout: body_timeout,
                gap: None,
                conn: conn.clone(),
            })
        });
        async move {
            let resp = tower_service::Service::call(&mut app.clone(), req).await;
            let now = table.now();
            conn.wait_started.store(now, Ordering::Relaxed);
            conn.last_io.store(now, Ordering::Relaxed);
            conn.read_while_waiting.store(false, Ordering::Relaxed);
            conn.served.fetch_add(1, Ordering::Relaxed);
            conn.busy.store(false, Ordering::Relaxed);
            resp
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The header timeout is this module's (from the start of the wait, see the module doc).
    builder.header_read_timeout(None);
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

    #[test]
    fn at_the_cap_the_oldest_waiting_connection_gives_way_never_a_busy_one() {
        let t = table(3);
        let (a, ca, _) = t.admit().unwrap();
        let (_b, cb, _) = t.admit().unwrap();
        let (_c, cc, _) = t.admit().unwrap();
        ca.busy.store(true, Ordering::Relaxed); // the oldest has a request in service
        cb.wait_started.store(5, Ordering::Relaxed);
        cc.wait_started.store(10, Ordering::Relaxed);
        let (_d, _, evicted) = t.admit().expect("room is made");
        assert!(evicted);
        let ids: Vec<u64> = t.conns.lock().unwrap().keys().copied().collect();
        assert!(ids.contains(&a), "the busy one stays");
        assert_eq!(t.len(), 3);
        assert!(!t
            .conns
            .lock()
            .unwrap()
            .values()
            .any(|c| Arc::ptr_eq(c, &cb)));
        // All busy: a new one is refused.
        for c in t.conns.lock().unwrap().values() {
            c.busy.store(true, Ordering::Relaxed);
        }
        assert!(t.admit().is_none());
        drop(cc);
    }

    #[test]
    fn waiting_connections_expire_by_their_timeouts() {
        let t = table(10);
        let (_, half, _) = t.admit().unwrap(); // fresh: header timeout (100 ms)
        let (_, idle, _) = t.admit().unwrap();
        idle.read_while_waiting.store(false, Ordering::Relaxed); // after an answer
        let (_, busy, _) = t.admit().unwrap();
        busy.busy.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(150));
        t.reap();
        assert_eq!(
            t.len(),
            2,
            "the half-sent one is closed after the header timeout"
        );
        std::thread::sleep(Duration::from_millis(100));
        t.reap();
        assert_eq!(t.len(), 1, "the idle one after the keep-alive timeout");
        assert!(t
            .conns
            .lock()
            .unwrap()
            .values()
            .all(|c| Arc::ptr_eq(c, &busy)));
        drop(half);
    }

    #[test]
    fn shutdown_closes_what_has_no_whole_request_and_lets_the_rest_finish() {
        let t = table(10);
        let (_, waiting, _) = t.admit().unwrap();
        let (_, half_body, _) = t.admit().unwrap();
        half_body.busy.store(true, Ordering::Relaxed);
        half_body.body_done.store(false, Ordering::Relaxed);
        let (_, serving, _) = t.admit().unwrap();
        serving.busy.store(true, Ordering::Relaxed);
        assert_eq!(t.begin_shutdown(), (2, 1));
        assert_eq!(t.close_all(), 1);
        drop((waiting, half_body, serving));
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
