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

//!
//! Here: the [`Limits`], the listener ([`serve`]), each connection's hyper task and TLS.
//! Beside it, `table` (the connections and their states: admit, evict, reap, shut down)
//! and `progress` (the stream and bodies that move a connection through its states). It
//! must not reach into `api` or any module that serves: it is handed an `axum::Router`.

mod progress;
mod table;

pub use self::progress::BodyTimeout;
use self::progress::{AnswerBody, TimedBody, Tracked};
pub(crate) use self::table::RateLimited;
use self::table::{Conn, State, Table};
use axum::body::Body;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
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
            let mut resp = if admitted {
                tower_service::Service::call(&mut app.clone(), req)
                    .await
                    .unwrap_or_else(|never| match never {})
            } else {
                closing_answer()
            };
            if !conn.body_done.load(Ordering::Acquire) {
                // Answered before the body was read whole (a 413 on its Content-Length,
                // a 401, a 404 for an unknown model): hyper closes the connection rather
                // than read the rest, so the answer says so. Without it a client reused
                // the connection and sent its next request into the closing socket
                // (bench/soak.py: 8 requests of 54,000 lost that way).
                resp.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
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

/// Loads a PEM certificate chain and private key for a listener that speaks `alpn`
/// (`http/1.1` for the HTTP API, `h2` for gRPC).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    alpn: &[u8],
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
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests;
