//! The server's log: `tracing` events as text (colours only on a terminal) or as JSON, one
//! object per line, for everything the process writes.
//!
//! Under `--log-format json` the native libraries' own stderr (libtorch's and
//! TensorFlow's warnings, a Rust panic's message) is captured too: fd 2 becomes a pipe
//! whose lines a thread turns into events of target `nnserve::native`, and the log
//! itself is written to a duplicate of the original stderr. The lines for scripts on
//! stdout ("nnserve listening on ...") are JSON objects of the same shape there.

use std::io::{IsTerminal, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// The longest native stderr line kept whole; the rest of a longer one is cut.
const MAX_NATIVE_LINE: usize = 16 << 10;

/// Restores stderr and lets the capture thread write its last lines (see [`finish`]).
pub struct Capture {
    saved: OwnedFd,
    reader: std::thread::JoinHandle<()>,
}

static CAPTURE: std::sync::Mutex<Option<Capture>> = std::sync::Mutex::new(None);

/// Installs the subscriber. `filter` is a `RUST_LOG` filter.
pub fn init(filter: &str, format: Format) -> anyhow::Result<()> {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    match format {
        Format::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        Format::Json => {
            let (log, capture) = capture_stderr()?;
            tracing_subscriber::fmt()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_env_filter(filter)
                .with_writer(std::sync::Arc::new(log))
                .init();
            *CAPTURE.lock().unwrap() = Some(capture);
        }
    }
    Ok(())
}

/// fd 2 becomes a pipe read by a thread; the log goes to a duplicate of the old fd 2.
fn capture_stderr() -> anyhow::Result<(std::fs::File, Capture)> {
    // SAFETY: dup and pipe return new descriptors or -1, checked below; dup2 replaces
    // fd 2 atomically, so no write to stderr is lost or goes elsewhere.
    unsafe {
        let saved = libc::dup(2);
        anyhow::ensure!(
            saved >= 0,
            "cannot duplicate stderr: {}",
            std::io::Error::last_os_error()
        );
        let saved = OwnedFd::from_raw_fd(saved);
        let log = std::fs::File::from(saved.try_clone()?);
        let mut fds = [0; 2];
        anyhow::ensure!(
            libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) == 0,
            "cannot make a pipe for stderr: {}",
            std::io::Error::last_os_error()
        );
        let (read, write) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        use std::os::fd::AsRawFd;
        anyhow::ensure!(
            libc::dup2(write.as_raw_fd(), 2) == 2,
            "cannot redirect stderr: {}",
            std::io::Error::last_os_error()
        );
        drop(write); // fd 2 is now the pipe's only writer
        let reader = std::thread::Builder::new()
            .name("nnserve-stderr".into())
            .spawn(move || relay(std::fs::File::from(read)))?;
        Ok((log, Capture { saved, reader }))
    }
}

/// Each line written to fd 2, as an event (level from the line's own marker).
fn relay(pipe: std::fs::File) {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a line without a newline is read in pieces of MAX_NATIVE_LINE.
        match std::io::Read::take(&mut lines, MAX_NATIVE_LINE as u64).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        let line = text.trim_end();
        if line.is_empty() {
            continue;
        }
        match native_level(line) {
            tracing::Level::ERROR => tracing::error!(target: "nnserve::native", "{line}"),
            tracing::Level::INFO => tracing::info!(target: "nnserve::native", "{line}"),
            _ => tracing::warn!(target: "nnserve::native", "{line}"),
        }
    }
}

/// The level a native line gives itself: glog/abseil (`I1205 ...`, `W...`, `E...`),
/// TensorFlow (`2026-12-05 14:00:00.0: I tensorflow/...`), c10 (`[W1205 ...]`); a Rust
/// panic or anything else is a warning.
pub fn native_level(line: &str) -> tracing::Level {
    let marker = |s: &str| {
        let mut c = s.chars();
        match (c.next(), c.next()) {
            (Some(l @ ('I' | 'W' | 'E' | 'F')), Some(d)) if d.is_ascii_digit() || d == ' ' => {
                Some(l)
            }
            _ => None,
        }
    };
    let found = marker(line.trim_start_matches('['))
        .or_else(|| line.split_once(": ").and_then(|(_, rest)| marker(rest)));
    match found {
        Some('I') => tracing::Level::INFO,
        Some('E' | 'F') => tracing::Level::ERROR,
        _ if line.starts_with("thread '") && line.contains("panicked") => tracing::Level::ERROR,
        _ => tracing::Level::WARN,
    }
}

/// A line for scripts on stdout (they wait for "nnserve listening on"): as it is, or a
/// JSON object like the log's under `--log-format json`.
pub fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = if FORMAT.get() == Some(&Format::Json) {
        let obj = serde_json::json!({
            "timestamp": timestamp(),
            "level": "INFO",
            "fields": { "message": line },
            "target": "nnserve",
        });
        writeln!(out, "{obj}")
    } else {
        writeln!(out, "{line}")
    };
    let _ = out.flush();
}

fn timestamp() -> String {
    use tracing_subscriber::fmt::time::FormatTime;
    let mut s = String::new();
    let _ = tracing_subscriber::fmt::time::SystemTime
        .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut s));
    s
}

/// Whether stderr is being captured (`--log-format json`).
pub fn capturing() -> bool {
    CAPTURE.lock().unwrap().is_some()
}

/// Before the process exits: fd 2 goes back to the real stderr (closing the pipe) and
/// the capture thread writes what it still holds, for up to a second.
pub fn finish() {
    let Some(capture) = CAPTURE.lock().unwrap().take() else {
        return;
    };
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto fd 2 of a descriptor this process owns.
    unsafe { libc::dup2(capture.saved.as_raw_fd(), 2) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while !capture.reader.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::native_level;
    use tracing::Level;

    #[test]
    fn native_lines_keep_their_level() {
        let cases = [
            ("2026-12-05 14:00:00.000001: I tensorflow/core/platform/cpu_feature_guard.cc:210] This TensorFlow binary is optimized", Level::INFO),
            ("2026-12-05 14:00:00.000001: E external/local_xla/xla/stream_executor/cuda/cuda_driver.cc:152] failed call", Level::ERROR),
            ("[W1205 14:00:00.000000000 init.cpp:42] Warning: something (function f)", Level::WARN),
            ("I0000 00:00:1733400000.000000    1234 service.cc:145] XLA service", Level::INFO),
            ("thread 'main' panicked at host/src/x.rs:1:1:", Level::ERROR),
            ("Whatever a library prints", Level::WARN),
        ];
        for (line, level) in cases {
            assert_eq!(native_level(line), level, "{line}");
        }
    }
}
