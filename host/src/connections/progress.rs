//! What moves a connection along, recorded on its [`Conn`]: the transport under hyper
//! ([`Tracked`]: every byte read or written), the request body ([`TimedBody`]: it must
//! keep coming, else [`BodyTimeout`]) and the answer's body ([`AnswerBody`]: the
//! connection is `BUSY` until it has been taken whole).
//!
//! It decides nothing: which connections close is the [`Table`]'s.

use super::table::{Conn, State, Table};
use super::MIN_BODY_RATE;
use axum::body::Body;
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The transport under hyper, with its reads and writes recorded on the connection.
pub(super) struct Tracked<S> {
    pub(super) inner: S,
    pub(super) conn: Arc<Conn>,
    pub(super) table: Arc<Table>,
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
pub(super) struct TimedBody {
    pub(super) inner: Incoming,
    pub(super) timeout: Duration,
    pub(super) gap: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the current stall began, and the stalls before it.
    pub(super) stalled_since: Option<Instant>,
    pub(super) stalled: Duration,
    pub(super) bytes: u64,
    pub(super) conn: Arc<Conn>,
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
pub(super) struct AnswerBody {
    pub(super) inner: Body,
    pub(super) conn: Arc<Conn>,
    pub(super) table: Arc<Table>,
    pub(super) done: bool,
}

impl AnswerBody {
    pub(super) fn finish(&mut self) {
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
