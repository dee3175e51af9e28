//! The gRPC listener: tonic's own server runs the HTTP/2 connections (streams, flow
//! control, GOAWAY); this module hands it the connections under the same policy as the
//! HTTP listener's (`connections`), as far as HTTP/2 allows:
//!
//! - at most `max_connections` open; past it a new connection is refused (logged,
//!   rate-limited). gRPC clients keep one channel open and multiplex on it, so a full
//!   table means as many clients, not requests;
//! - TLS when the server has a certificate (ALPN `h2`), the handshake within
//!   `header_read_timeout`;
//! - keep-alive pings every `keep_alive_timeout`, and a connection whose peer does not
//!   answer one within `header_read_timeout` is closed (a dead peer's descriptor is
//!   freed); a live idle channel stays open, as gRPC clients expect;
//! - every call bounded by `request_timeout` plus `body_read_timeout` in all, so a
//!   request whose body trickles in cannot hold a stream (inference itself ends at the
//!   request's deadline, `grpc-timeout` or `request_timeout_ms`, before that);
//! - on shutdown: no new connections, GOAWAY to the open ones, calls in service finish
//!   within `grace`; after it (or a second signal) what is left is cut.

use crate::connections::Limits;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Serves `routes` on `listener` until `shutdown`, then as the module doc says.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    bound: super::bound::BoundLayer,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    force: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(64);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let acceptor = {
        let limits = limits.clone();
        tokio::spawn(async move {
            let refusals = crate::connections::RateLimited::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop_rx.changed() => return,
                };
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        refusals.warn(format_args!("gRPC: cannot accept a connection: {e}"));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                };
                if open.load(Ordering::Acquire) >= limits.max_connections {
                    refusals.warn(format_args!(
                        "gRPC: refused a connection: {} are open (max_connections)",
                        limits.max_connections
                    ));
                    continue;
                }
                let slot = Slot::take(&open);
                let _ = tcp.set_nodelay(true);
                let (tx, tls, timeout) = (tx.clone(), tls.clone(), limits.header_read_timeout);
                tokio::spawn(async move {
                    let io = match tls {
                        None => Io::Plain(tcp),
                        Some(acceptor) => {
                            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => Io::Tls(Box::new(s)),
                                Ok(Err(e)) => {
                                    tracing::debug!("gRPC: TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("gRPC: TLS handshake timed out");
                                    return;
                                }
                            }
                        }
                    };
                    let _ = tx.send(Ok(Conn { io, _slot: slot })).await;
                });
            }
        })
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keep_alive_timeout))
        .http2_keepalive_timeout(Some(limits.header_read_timeout))
        .http2_max_header_list_size(crate::connections::MAX_CONNECTION_BUFFER as u32)
        .layer(bound)
        .add_routes(routes);
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve_with_incoming_shutdown(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            let _ = stopped_tx.send(());
        },
    ));
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => return finish(r),
        _ = stopped_rx => {}
    }
    acceptor.abort();
    tracing::info!(
        "gRPC: shutting down: GOAWAY sent; calls in service get up to {} s",
        limits.grace.as_secs_f32()
    );
    let cut = tokio::select! {
        r = &mut serving => return finish(r),
        _ = tokio::time::sleep(limits.grace) => "after the grace period",
        _ = force => "on a second signal",
    };
    tracing::warn!("gRPC: cut the calls still in service {cut}");
    serving.abort();
    Ok(())
}

fn finish(
    r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    r.map_err(|e| anyhow::anyhow!("the gRPC server stopped: {e}"))?
        .map_err(|e| anyhow::anyhow!("the gRPC server failed: {e}"))
}

/// One of the open connections, counted until it is dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Slot {
        open.fetch_add(1, Ordering::AcqRel);
        Slot(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection handed to tonic: plain or TLS, holding its slot.
struct Conn {
    io: Io,
    _slot: Slot,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
