//! A plugin's stdout and stderr (`println!`, `eprintln!`): kept per call, capped, and
//! written to the server log at debug level after the call, one event per line, tagged
//! with the plugin and the stream, control characters escaped. Only kept while debug
//! logging of target `nnserve::plugin::output` is on (`nnserve::plugin=debug`
//! turns it on too); otherwise the streams go nowhere, as
//! before. Past the cap bytes are dropped silently and counted: a plugin's print must
//! never fail (Rust's `println!` panics on a write error) or trap for it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi_io::bytes::Bytes;
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{OutputStream, StreamResult};

/// The most bytes of one stream kept per call.
pub const MAX_OUTPUT_BYTES: usize = 16 << 10;

/// The longest line logged whole (escaped); the rest is cut with its length.
const MAX_LINE: usize = 1024;

/// One stream's bytes of the current call.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Captured {
    fn push(&self, b: &[u8]) {
        let mut k = self.0.lock().unwrap();
        let room = MAX_OUTPUT_BYTES.saturating_sub(k.bytes.len());
        let n = room.min(b.len());
        k.bytes.extend_from_slice(&b[..n]);
        k.dropped += b.len() - n;
    }

    /// What was written since the last call, as lines (the last one may lack its
    /// newline), and how many bytes past the cap were dropped.
    pub fn take(&self) -> (Vec<String>, usize) {
        let mut k = self.0.lock().unwrap();
        let bytes = std::mem::take(&mut k.bytes);
        let dropped = std::mem::take(&mut k.dropped);
        let text = String::from_utf8_lossy(&bytes);
        let lines = text
            .split_terminator('\n')
            .map(|l| crate::names::log_safe(l.strip_suffix('\r').unwrap_or(l), MAX_LINE))
            .collect();
        (lines, dropped)
    }
}

/// A call's stdout and stderr.
#[derive(Clone, Default)]
pub struct Output {
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Output {
    /// Whether plugin output is wanted in the log now.
    pub fn wanted() -> bool {
        tracing::enabled!(target: "nnserve::plugin::output", tracing::Level::DEBUG)
    }

    /// Writes what the call printed to the log, and forgets it.
    pub fn flush(&self, plugin: &str) {
        for (stream, captured) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let (lines, dropped) = captured.take();
            for line in lines {
                tracing::debug!(target: "nnserve::plugin::output", plugin, stream, "{line}");
            }
            if dropped > 0 {
                tracing::debug!(target: "nnserve::plugin::output", plugin, stream, dropped,
                    "{dropped} more bytes of {stream} were dropped (at most {MAX_OUTPUT_BYTES} per call are kept)");
            }
        }
    }
}

impl IsTerminal for Captured {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Captured {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for Captured {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        // Always room: what does not fit is dropped, not refused.
        Ok(64 << 10)
    }
}

#[wasmtime_wasi_io::async_trait]
impl Pollable for Captured {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Captured {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_escaped_and_the_rest_past_the_cap_counted() {
        let c = Captured::default();
        c.push(b"hello\nforged\x1b[31m line\r\npartial");
        let (lines, dropped) = c.take();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "hello");
        assert!(!lines[1].contains('\x1b'), "{}", lines[1]);
        assert_eq!(lines[2], "partial");
        assert_eq!(dropped, 0);
        c.push(&vec![b'x'; MAX_OUTPUT_BYTES + 10]);
        let (_, dropped) = c.take();
        assert_eq!(dropped, 10);
        assert_eq!(c.take(), (Vec::<String>::new(), 0), "taken once");
    }
}
