//! The stream's guards, below the `tar` crate: compressed bytes counted
//! ([`LimitedReader`]) and the tar framing watched ([`HeaderGuard`]) so that oversized
//! metadata headers, sparse entries and output past the compression-ratio bound stop the
//! stream before the crate buffers them.
//!
//! Bytes only: which entries may be written, and where, is `unpack`'s.

use super::{Limits, MAX_META_ENTRY_BYTES};
use std::io::{self, Read};

/// Counts compressed bytes and fails once more than the limit has been read.
pub(super) struct LimitedReader<R> {
    pub(super) inner: R,
    pub(super) left: u64,
    /// Compressed bytes read so far, for the compression-ratio bound.
    pub(super) read: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "archive size limit",
            ));
        }
        self.left -= n as u64;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// The [`HeaderGuard`]'s refusal behind an error of the `tar` crate, which may wrap it.
pub(super) fn guard_refusal(e: &io::Error) -> Option<String> {
    let mut at: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(err) = at {
        if let Some(m) = err.downcast_ref::<MetaTooLarge>() {
            return Some(m.to_string());
        }
        if let Some(m) = err.downcast_ref::<Refused>() {
            return Some(m.to_string());
        }
        at = match err.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|e| e as _),
            None => err.source(),
        };
    }
    None
}

/// A PAX or GNU long-name header entry over [`MAX_META_ENTRY_BYTES`].
#[derive(Debug)]
struct MetaTooLarge {
    kind: &'static str,
    size: u64,
}

impl std::fmt::Display for MetaTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the archive has a {} of {} bytes; at most {} are accepted",
            self.kind, self.size, MAX_META_ENTRY_BYTES
        )
    }
}

impl std::error::Error for MetaTooLarge {}

/// Other refusals of the [`HeaderGuard`].
#[derive(Debug)]
enum Refused {
    /// More decompressed bytes than the ratio bound allows.
    Ratio(u64),
    /// A GNU sparse entry: the tar crate reads extension blocks the guard does not frame.
    Sparse,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Ratio(r) => write!(
                f,
                "the archive unpacks to more than {r} times its compressed size; \
                 a bundle this compressible is refused (a gzip bomb looks like this)"
            ),
            Refused::Sparse => {
                f.write_str("the archive has a GNU sparse entry; bundles hold plain files")
            }
        }
    }
}

impl std::error::Error for Refused {}

/// Watches the decompressed tar stream as the `tar` crate reads it. It stops the stream
/// at a PAX extended header (`x`, `g`) or GNU long-name/long-link entry (`L`, `K`) larger
/// than [`MAX_META_ENTRY_BYTES`], before the crate reads one into memory; at a GNU sparse
/// entry; and once more bytes come out than the compression-ratio bound allows (every
/// byte counts, also data the crate skips). Hand-written: the crate has no such limits.
/// It follows the framing: a 512-byte header, then the entry's data padded to 512, then
/// the next header; an all-zero block is the end. `unpack` checks that the crate's
/// framing agrees with it at every entry ([`HeaderGuard::last_header`]).
pub(super) struct HeaderGuard<R> {
    inner: R,
    /// Offset of the stream passed on so far.
    at: u64,
    /// Offset of the next header block.
    next_header: u64,
    /// The header being read, when `at` is inside one.
    header: Vec<u8>,
    /// Offset of the last header block seen whole.
    pub(super) last_header: std::rc::Rc<std::cell::Cell<u64>>,
    /// Compressed bytes read so far, and the ratio bound over them.
    compressed: std::rc::Rc<std::cell::Cell<u64>>,
    max_ratio: u64,
    ratio_floor: u64,
}

impl<R: Read> HeaderGuard<R> {
    pub(super) fn new(
        inner: R,
        compressed: std::rc::Rc<std::cell::Cell<u64>>,
        limits: &Limits,
    ) -> Self {
        HeaderGuard {
            inner,
            at: 0,
            next_header: 0,
            header: Vec::with_capacity(512),
            last_header: Default::default(),
            compressed,
            max_ratio: limits.max_ratio,
            ratio_floor: limits.ratio_floor,
        }
    }

    /// Looks at a complete header block: where the next one is, and whether it is a
    /// metadata entry over the bound.
    fn on_header(&mut self) -> io::Result<()> {
        let h = &self.header;
        let start = self.next_header;
        self.last_header.set(start);
        if h[156] == b'S' {
            return Err(io::Error::new(io::ErrorKind::InvalidData, Refused::Sparse));
        }
        if h.iter().all(|&b| b == 0) {
            self.next_header = start + 512;
            return Ok(());
        }
        let size = header_size(&h[124..136]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a tar header with an unreadable size",
            )
        })?;
        let kind = match h[156] {
            b'x' => Some("PAX extended header"),
            b'g' => Some("PAX global header"),
            b'L' => Some("GNU long name"),
            b'K' => Some("GNU long link name"),
            _ => None,
        };
        if let Some(kind) = kind.filter(|_| size > MAX_META_ENTRY_BYTES) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                MetaTooLarge { kind, size },
            ));
        }
        self.next_header = start
            .saturating_add(512)
            .saturating_add(size.div_ceil(512).saturating_mul(512));
        Ok(())
    }
}

/// A tar header's size field: octal text, or GNU's base-256 when the high bit is set.
fn header_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut i = 0;
        while i < n {
            let at = self.at + i as u64;
            if at < self.next_header {
                // Entry data: skip to the next header, or the end of what was read.
                let skip = (self.next_header - at).min((n - i) as u64) as usize;
                i += skip;
                continue;
            }
            let take = (512 - self.header.len()).min(n - i);
            self.header.extend_from_slice(&buf[i..i + take]);
            i += take;
            if self.header.len() == 512 {
                self.on_header()?;
                self.header.clear();
            }
        }
        self.at += n as u64;
        let allowed = self
            .ratio_floor
            .max(self.compressed.get().saturating_mul(self.max_ratio));
        if self.at > allowed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                Refused::Ratio(self.max_ratio),
            ));
        }
        Ok(n)
    }
}
