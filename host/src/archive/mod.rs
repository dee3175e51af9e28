//! Bundle archives: the digest of a bundle's content, deterministic packing into a
//! `.tar.gz`, and unpacking an untrusted archive safely.
//!
//! Unpacking never writes outside its destination: paths that climb out (`..`), absolute
//! paths, symlinks or hard links that point out, and device files are refused; sizes are
//! capped (archive, each file, unpacked total, file count) while streaming, so a gzip
//! bomb stops at the limit with bounded memory. Every problem found is reported.
//!
//! The digest is sha256 over the sorted list of (path, sha256 of the file's bytes), one
//! line `path NUL hex-sha256 LF` each (a symlink contributes `path NUL "->" target LF`),
//! so the same content has the same digest however it was packed.

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// Size limits for unpacking an untrusted archive.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Compressed bytes read.
    pub max_archive_bytes: u64,
    /// Bytes of any one file.
    pub max_file_bytes: u64,
    /// Bytes of all files together.
    pub max_total_bytes: u64,
    /// Entries of any kind.
    pub max_entries: usize,
    /// Past [`Limits::ratio_floor`] unpacked bytes, at most this many per compressed byte
    /// read: a 4 MB archive of zeros no longer writes gigabytes before a limit stops it.
    /// Model weights compress about 1.1:1 and text about 5:1; gzip's own limit is 1032:1.
    pub max_ratio: u64,
    /// Unpacked bytes allowed whatever the ratio.
    pub ratio_floor: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_archive_bytes: 4 << 30,
            max_file_bytes: 4 << 30,
            max_total_bytes: 8 << 30,
            max_entries: 10_000,
            max_ratio: 100,
            ratio_floor: 64 << 20,
        }
    }
}

/// The largest PAX extended header or GNU long-name/long-link entry: the `tar` crate
/// reads these whole into memory before any limit sees an entry (a 1 MB upload
/// declaring a 1 GiB PAX header took the server from 0.6 to 3.8 GB). Real ones hold a
/// path or two and a few attributes.
pub const MAX_META_ENTRY_BYTES: u64 = 64 << 10;

/// The most problems an unpack reports; past it, their count.
const MAX_REASONS: usize = 20;

/// What the first bytes of an upload say.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// A gzip stream whose first block is a valid tar header.
    Tar,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// Compressed bytes after which the first tar header must have appeared.
pub const START_BYTES: usize = 64 << 10;

/// Checks the first bytes of an upload before anything is spooled to disk: the gzip
/// magic, and that what they decompress to starts with a valid tar header. `whole` says
/// whether `prefix` is the entire upload.
pub fn check_start(prefix: &[u8], whole: bool) -> Result<Start, String> {
    const HOW: &str =
        "make one with `nnserve bundle pack DIR` or `tar -C DIR -czf bundle.tar.gz .`";
    if prefix.len() < 2 && !whole {
        return Ok(Start::NeedMore);
    }
    if prefix.len() < 2 || prefix[..2] != [0x1f, 0x8b] {
        return Err(format!(
            "the upload is not a .tar.gz archive (it does not start with gzip's magic bytes); {HOW}"
        ));
    }
    let mut block = [0u8; 512];
    let mut got = 0;
    let mut gz = GzDecoder::new(prefix);
    while got < block.len() {
        match gz.read(&mut block[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            // A prefix cut mid-stream ends with an unexpected EOF: judge what came out.
            Err(_) if !whole && prefix.len() < START_BYTES => return Ok(Start::NeedMore),
            Err(e) => {
                return Err(format!(
                    "the upload is not a valid gzip stream ({e}); {HOW}"
                ))
            }
        }
    }
    if got < block.len() && !whole && prefix.len() < START_BYTES {
        return Ok(Start::NeedMore);
    }
    if got < block.len() {
        return Err(if whole {
            format!("the archive is too short to hold a tar header; {HOW}")
        } else {
            format!("the archive's first 64 KiB do not decompress to a tar header; {HOW}")
        });
    }
    if block.iter().all(|&b| b == 0) {
        return Err(format!("the archive is empty; {HOW}"));
    }
    if !header_checksum_ok(&block) {
        return Err(format!(
            "the gzip stream does not hold a tar archive (the first header's checksum is wrong); {HOW}"
        ));
    }
    Ok(Start::Tar)
}

/// A tar header's checksum: the sum of its bytes with the checksum field as spaces.
fn header_checksum_ok(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let text = String::from_utf8_lossy(field);
    let Ok(stored) = u32::from_str_radix(text.trim_matches(|c: char| c == ' ' || c == '\0'), 8)
    else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                b' ' as u32
            } else {
                b as u32
            }
        })
        .sum();
    sum == stored
}

/// What an unpack wrote.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub files: usize,
    pub bytes: u64,
}

/// Unpacks a `.tar.gz` into `dest` (which must exist and be empty). On error, `dest` may
/// hold part of the archive: callers unpack into a temporary directory and discard it.
/// A single top-level directory around `bundle.toml` is lifted into `dest`.
pub fn unpack(archive: impl Read, dest: &Path, limits: &Limits) -> Result<Unpacked, Vec<String>> {
    let mut reasons = Vec::new();
    let mut done = Unpacked::default();
    let compressed = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let counted = LimitedReader {
        inner: archive,
        left: limits.max_archive_bytes,
        read: compressed.clone(),
    };
    let guard = HeaderGuard::new(GzDecoder::new(counted), compressed.clone(), limits);
    let last_header = guard.last_header.clone();
    let mut tar = tar::Archive::new(guard);
    // Unpacked bytes allowed so far: the floor, or the ratio to the compressed bytes read.
    let allowed = || {
        limits
            .ratio_floor
            .max(compressed.get().saturating_mul(limits.max_ratio))
    };
    let entries = tar
        .entries()
        .map_err(|e| vec![format!("not a .tar.gz archive: {e}")])?;
    let mut count = 0usize;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                reasons.push(read_error(e, limits));
                break;
            }
        };
        // The guard must have seen this entry's header where the tar crate read it, and
        // the size it framed the entry with must be the one the crate uses: a PAX `size`
        // record that differs (or anything else that moves the crate's framing) would
        // let later headers pass the guard unchecked, so the archive is refused.
        let framed = entry.header().entry_size().ok();
        if entry.raw_header_position() != last_header.get() || framed != Some(entry.size()) {
            reasons.push(
                "the archive's framing is inconsistent (a PAX size record that differs from its \
                 header's, or a sparse entry); repack it with `nnserve bundle pack`"
                    .to_string(),
            );
            break;
        }
        count += 1;
        if count > limits.max_entries {
            reasons.push(format!(
                "the archive has more than {} entries",
                limits.max_entries
            ));
            break;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        // Every message shows the name bounded: a 65 KB long name was echoed whole.
        let raw = crate::names::bounded(&path);
        let rel = match safe_relative(&path) {
            Ok(Some(p)) => p,
            Ok(None) => continue, // "." or "./"
            Err(why) => {
                reasons.push(format!("`{raw}`: {why}"));
                continue;
            }
        };
        // Each symlink is checked where its path says it is; an entry whose path goes
        // through a symlink made by an earlier entry would land elsewhere (a chain such as
        // `a -> .`, `a/b -> ..`, `a/b/c -> ..` climbs out one level per link).
        if let Err(why) = not_through_symlink(dest, &rel) {
            reasons.push(format!("`{raw}`: {why}"));
            continue;
        }
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        let size = entry.header().size().unwrap_or(u64::MAX);
        let result = match kind {
            tar::EntryType::Directory => fs::create_dir_all(&target).map_err(|e| e.to_string()),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if size > limits.max_file_bytes {
                    reasons.push(format!(
                        "`{raw}` is {size} bytes, over the limit of {} bytes per file",
                        limits.max_file_bytes
                    ));
                    break;
                }
                if done.bytes + size > limits.max_total_bytes {
                    reasons.push(format!(
                        "the unpacked bundle exceeds the limit of {} bytes",
                        limits.max_total_bytes
                    ));
                    break;
                }
                match write_file(&mut entry, &target, size) {
                    Ok(n) => {
                        done.files += 1;
                        done.bytes += n;
                        Ok(())
                    }
                    Err(why) => {
                        // The stream itself failed (a bound of the guard, or corruption):
                        // nothing after it can be read reliably.
                        reasons.push(format!("`{raw}`: {why}"));
                        break;
                    }
                }
            }
            tar::EntryType::Symlink => match entry.link_name_bytes() {
                Some(link) => {
                    let link = String::from_utf8_lossy(&link).into_owned();
                    if link.len() > 4096 {
                        reasons.push(format!("`{raw}`: a symlink target of {} bytes", link.len()));
                        continue;
                    }
                    let shown = crate::names::bounded(&link);
                    link_inside(&rel, &link)
                        .map_err(|why| format!("symlink to `{shown}` {why}"))
                        .and_then(|_| {
                            ensure_parent(&target)?;
                            std::os::unix::fs::symlink(&link, &target).map_err(|e| e.to_string())
                        })
                }
                None => Err("a symlink without a target".into()),
            },
            tar::EntryType::Link => match entry.link_name_bytes() {
                // A hard link names another entry of the archive; we copy that file.
                Some(link) => {
                    let link = String::from_utf8_lossy(&link).into_owned();
                    if link.len() > 4096 {
                        reasons.push(format!(
                            "`{raw}`: a hard link target of {} bytes",
                            link.len()
                        ));
                        continue;
                    }
                    let plain_file = |src: &Path| {
                        not_through_symlink(dest, src).is_ok()
                            && fs::symlink_metadata(dest.join(src)).is_ok_and(|m| m.is_file())
                    };
                    let shown = crate::names::bounded(&link);
                    match safe_relative(&link) {
                        Ok(Some(src)) if plain_file(&src) => {
                            // A copy writes data no compressed byte paid for: the same
                            // bounds as a file's (one 64 MiB file linked 10,000 times
                            // would write 640 GB).
                            let len = fs::metadata(dest.join(&src)).map_or(u64::MAX, |m| m.len());
                            let after = done.bytes.saturating_add(len);
                            if after > limits.max_total_bytes || after > allowed() {
                                reasons.push(format!(
                                    "`{raw}`: hard links copy more than the archive may unpack to \
                                     ({} bytes, or {} times its compressed size)",
                                    limits.max_total_bytes, limits.max_ratio
                                ));
                                break;
                            }
                            ensure_parent(&target).and_then(|_| {
                                fs::copy(dest.join(&src), &target)
                                    .map(|n| {
                                        done.files += 1;
                                        done.bytes += n;
                                    })
                                    .map_err(|e| e.to_string())
                            })
                        }
                        Ok(_) => Err(format!(
                            "hard link to `{shown}`, which is not a plain file earlier in the archive"
                        )),
                        Err(why) => Err(format!("hard link to `{shown}`: {why}")),
                    }
                }
                None => Err("a hard link without a target".into()),
            },
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName => Ok(()),
            other => {
                // Refused, and the rest is not read: the tar crate frames some kinds
                // (sparse entries) in ways the header guard does not follow.
                reasons.push(format!(
                    "`{raw}`: is a {other:?} entry; bundles hold only files, directories and links inside them"
                ));
                break;
            }
        };
        if let Err(why) = result {
            reasons.push(format!("`{raw}`: {why}"));
        }
    }
    if reasons.is_empty() {
        // Links inside links: each was checked alone; what they resolve to together must
        // stay inside the bundle too (`x -> a/..` with `a -> ..` leaves it).
        reasons.extend(links_that_leave(dest));
    }
    if reasons.len() > MAX_REASONS {
        let more = reasons.len() - MAX_REASONS;
        reasons.truncate(MAX_REASONS);
        reasons.push(format!("and {more} more problems"));
    }
    if reasons.is_empty() {
        lift_single_directory(dest)
            .map_err(|e| vec![format!("cannot arrange the unpacked bundle: {e}")])?;
        Ok(done)
    } else {
        Err(reasons)
    }
}

fn read_error(e: io::Error, limits: &Limits) -> String {
    if e.kind() == io::ErrorKind::FileTooLarge {
        format!(
            "the archive is larger than the limit of {} bytes",
            limits.max_archive_bytes
        )
    } else if let Some(m) = guard_refusal(&e) {
        m
    } else {
        let e = crate::names::log_safe(&e.to_string(), 200);
        format!("the archive is corrupt or not a .tar.gz: {e}")
    }
}

/// A path inside the bundle, or why not. `None` for the root itself.
fn safe_relative(raw: &str) -> Result<Option<PathBuf>, String> {
    let path = Path::new(raw);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("climbs out of the bundle (`..`)".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("is an absolute path; bundle paths are relative".into())
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Does a symlink at `at` (relative) pointing to `link` stay inside the bundle?
fn link_inside(at: &Path, link: &str) -> Result<(), String> {
    if Path::new(link).is_absolute() {
        return Err("is absolute: links must stay inside the bundle".into());
    }
    let mut depth: i64 = at.components().count() as i64 - 1;
    for c in Path::new(link).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err("points outside the bundle".into());
        }
    }
    Ok(())
}

/// Refuses a path whose parent directories include a symlink (made by an earlier entry).
fn not_through_symlink(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut at = dest.to_path_buf();
    let parents = rel.components().count().saturating_sub(1);
    for c in rel.components().take(parents) {
        at.push(c);
        if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            let link = at.strip_prefix(dest).unwrap_or(&at).display().to_string();
            return Err(format!(
                "goes through the symlink `{link}`; entries may not be placed through links"
            ));
        }
    }
    Ok(())
}

/// Symlinks of the unpacked tree that resolve outside it or nowhere, as reasons.
fn links_that_leave(dest: &Path) -> Vec<String> {
    let Ok(root) = fs::canonicalize(dest) else {
        return vec!["cannot resolve the unpacked bundle's directory".into()];
    };
    let Ok(files) = list_files(dest) else {
        return vec!["cannot list the unpacked bundle".into()];
    };
    files
        .iter()
        .filter(|(_, meta)| meta.file_type().is_symlink())
        .filter_map(|(rel, _)| match fs::canonicalize(dest.join(rel)) {
            Ok(real) if real.starts_with(&root) => None,
            Ok(_) => Some(format!(
                "`{rel}`: the symlink resolves outside the bundle (through other links)"
            )),
            Err(_) => Some(format!(
                "`{rel}`: the symlink leads to nothing in the bundle"
            )),
        })
        .collect()
}

fn ensure_parent(target: &Path) -> Result<(), String> {
    match target.parent() {
        Some(p) => fs::create_dir_all(p).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Writes one file of `size` bytes (the compression-ratio bound holds on the stream
/// itself: [`HeaderGuard`]).
fn write_file(entry: &mut impl Read, target: &Path, size: u64) -> Result<u64, String> {
    ensure_parent(target)?;
    // `create_new`: a second entry with the same path, or a path through a symlink made
    // earlier, must not overwrite anything.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(|e| e.to_string())?;
    let written = io::copy(&mut entry.take(size), &mut f).map_err(|e| {
        let e: io::Error = e;
        guard_refusal(&e).unwrap_or_else(|| e.to_string())
    })?;
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(written)
}

/// An archive made with `tar -czf b.tar.gz bundle/` has everything under `bundle/`.
fn lift_single_directory(dest: &Path) -> io::Result<()> {
    if dest.join("bundle.toml").exists() {
        return Ok(());
    }
    let entries: Vec<_> = fs::read_dir(dest)?.collect::<Result<_, _>>()?;
    if let [only] = entries.as_slice() {
        if only.file_type()?.is_dir() && only.path().join("bundle.toml").is_file() {
            let inner = only.path();
            for e in fs::read_dir(&inner)? {
                let e = e?;
                fs::rename(e.path(), dest.join(e.file_name()))?;
            }
            fs::remove_dir(inner)?;
        }
    }
    Ok(())
}

/// Counts compressed bytes and fails once more than the limit has been read.
struct LimitedReader<R> {
    inner: R,
    left: u64,
    /// Compressed bytes read so far, for the compression-ratio bound.
    read: std::rc::Rc<std::cell::Cell<u64>>,
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
fn guard_refusal(e: &io::Error) -> Option<String> {
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
struct HeaderGuard<R> {
    inner: R,
    /// Offset of the stream passed on so far.
    at: u64,
    /// Offset of the next header block.
    next_header: u64,
    /// The header being read, when `at` is inside one.
    header: Vec<u8>,
    /// Offset of the last header block seen whole.
    last_header: std::rc::Rc<std::cell::Cell<u64>>,
    /// Compressed bytes read so far, and the ratio bound over them.
    compressed: std::rc::Rc<std::cell::Cell<u64>>,
    max_ratio: u64,
    ratio_floor: u64,
}

impl<R: Read> HeaderGuard<R> {
    fn new(inner: R, compressed: std::rc::Rc<std::cell::Cell<u64>>, limits: &Limits) -> Self {
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

/// Every file and symlink under `dir`, as sorted relative paths with `/` separators.
pub fn list_files(dir: &Path) -> io::Result<Vec<(String, fs::Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let meta = fs::symlink_metadata(e.path())?;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, meta));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The bundle's content digest, `sha256:<hex>` (module doc).
pub fn digest(dir: &Path) -> io::Result<String> {
    let mut outer = Sha256::new();
    for (rel, meta) in list_files(dir)? {
        outer.update(rel.as_bytes());
        outer.update([0u8]);
        if meta.file_type().is_symlink() {
            outer.update(b"->");
            outer.update(fs::read_link(dir.join(&rel))?.to_string_lossy().as_bytes());
        } else {
            let mut inner = Sha256::new();
            io::copy(&mut fs::File::open(dir.join(&rel))?, &mut inner)?;
            outer.update(hex(&inner.finalize()).as_bytes());
        }
        outer.update(b"\n");
    }
    Ok(format!("sha256:{}", hex(&outer.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `dir` as a deterministic `.tar.gz`: sorted entries, mtime 0, owner 0, modes
/// 0644/0755, no gzip name or time. The same content always gives the same bytes.
/// `progress` is called with the bytes of file content written so far.
pub fn pack(dir: &Path, out: impl Write, mut progress: impl FnMut(u64)) -> io::Result<()> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut written = 0u64;
    for (rel, meta) in list_files(dir)? {
        let path = dir.join(&rel);
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            tar.append_link(&mut header, &rel, fs::read_link(&path)?)?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            });
            tar.append_data(&mut header, &rel, fs::File::open(&path)?)?;
            written += meta.len();
            progress(written);
        }
    }
    tar.into_inner()?.finish()?.flush()
}

use std::os::unix::fs::PermissionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip'd tar with raw entries, names written into the header as given (so that
    /// hostile names can be crafted).
    fn craft(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_old();
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn file<'a>(
        name: &'a str,
        data: &'static [u8],
    ) -> (&'a str, tar::EntryType, &'static [u8], Option<&'static str>) {
        (name, tar::EntryType::Regular, data, None)
    }

    fn unpack_bytes(
        bytes: &[u8],
        limits: &Limits,
    ) -> (tempfile::TempDir, Result<Unpacked, Vec<String>>) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let r = unpack(bytes, &dest, limits);
        (dir, r)
    }

    /// Nothing may appear beside `dest` in the scratch directory.
    fn nothing_outside(dir: &tempfile::TempDir) {
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["dest".to_string()]);
    }

    #[test]
    fn a_plain_archive_unpacks_and_a_wrapping_directory_is_lifted() {
        let bytes = craft(&[
            file("b/bundle.toml", b"x"),
            file("b/model/m.pt", b"weights"),
        ]);
        let (dir, r) = unpack_bytes(&bytes, &Limits::default());
        let done = r.unwrap();
        assert_eq!((done.files, done.bytes), (2, 8));
        assert_eq!(
            fs::read(dir.path().join("dest/model/m.pt")).unwrap(),
            b"weights"
        );
        assert!(dir.path().join("dest/bundle.toml").is_file());
    }

    #[test]
    fn path_traversal_is_refused() {
        let bytes = craft(&[
            file("bundle.toml", b"x"),
            file("../evil", b"x"),
            file("a/../../evil2", b"x"),
        ]);
        let (dir, r) = unpack_bytes(&bytes, &Limits::default());
        let reasons = r.unwrap_err();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(
            reasons.iter().all(|r| r.contains("climbs out")),
            "{reasons:?}"
        );
        nothing_outside(&dir);
    }

    #[test]
    fn absolute_paths_are_refused() {
        let bytes = craft(&[file("/tmp/nnserve-evil-absolute", b"x")]);
        let (_dir, r) = unpack_bytes(&bytes, &Limits::default());
        assert!(r.unwrap_err()[0].contains("absolute"));
        assert!(!Path::new("/tmp/nnserve-evil-absolute").exists());
    }

    #[test]
    fn symlinks_out_are_refused_and_links_inside_kept() {
        let bytes = craft(&[
            file("bundle.toml", b"x"),
            ("up", tar::EntryType::Symlink, b"", Some("../outside")),
            ("abs", tar::EntryType::Symlink, b"", Some("/etc/passwd")),
            (
                "assets/ok",
                tar::EntryType::Symlink,
                b"",
                Some("../bundle.toml"),
            ),
        ]);
        let (dir, r) = unpack_bytes(&bytes, &Limits::default());
        let reasons = r.unwrap_err();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("`up`") && reasons[0].contains("outside"));
        assert!(reasons[1].contains("`abs`") && reasons[1].contains("absolute"));
        assert!(dir.path().join("dest/assets/ok").is_symlink());
        nothing_outside(&dir);
    }

    #[test]
    fn chains_of_symlinks_cannot_place_or_point_anything_outside() {
        use tar::EntryType::{Link, Symlink};
        // Each link alone stays inside; together they climb out one level per link.
        // Unpacks, expects a refusal, checks nothing landed beside `dest`.
        let refused = |entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]| {
            let (dir, r) = unpack_bytes(&craft(entries), &Limits::default());
            nothing_outside(&dir);
            r.unwrap_err()
        };
        let reasons = refused(&[
            file("bundle.toml", b"x"),
            ("a", Symlink, b"", Some(".")),
            ("a/b", Symlink, b"", Some("..")),
            ("a/b/c", Symlink, b"", Some("..")),
            file("a/b/c/escaped.txt", b"PWNED"),
            ("a/b/c/hl", Link, b"", Some("bundle.toml")),
            ("pulled", Link, b"", Some("a/b/bundle.toml")),
        ]);
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("`a/b`") && r.contains("through the symlink `a`")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("escaped.txt")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("`pulled`")),
            "{reasons:?}"
        );
        // A link that points out is refused on its own, and so is the archive.
        let reasons = refused(&[
            file("bundle.toml", b"x"),
            ("a", Symlink, b"", Some("..")),
            ("x", Symlink, b"", Some("a/..")),
        ]);
        assert!(reasons.iter().any(|r| r.contains("`a`")), "{reasons:?}");
        // A link through another link, each inside on its own: refused once unpacked.
        let reasons = refused(&[
            file("bundle.toml", b"x"),
            ("d", tar::EntryType::Directory, b"", None),
            ("d/up", Symlink, b"", Some("..")),
            ("x", Symlink, b"", Some("d/up/d/up/..")),
        ]);
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("`x`") && r.contains("outside")),
            "{reasons:?}"
        );
    }

    #[test]
    fn hard_links_out_are_refused_and_inside_copied() {
        let bytes = craft(&[
            file("bundle.toml", b"x"),
            ("out", tar::EntryType::Link, b"", Some("/etc/passwd")),
            ("up", tar::EntryType::Link, b"", Some("../x")),
            ("copy", tar::EntryType::Link, b"", Some("bundle.toml")),
        ]);
        let (dir, r) = unpack_bytes(&bytes, &Limits::default());
        let reasons = r.unwrap_err();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons.iter().all(|r| r.contains("hard link")));
        assert_eq!(fs::read(dir.path().join("dest/copy")).unwrap(), b"x");
        nothing_outside(&dir);
    }

    #[test]
    fn device_files_are_refused() {
        let bytes = craft(&[
            file("bundle.toml", b"x"),
            ("dev", tar::EntryType::Char, b"", None),
        ]);
        let (_dir, r) = unpack_bytes(&bytes, &Limits::default());
        assert!(r.unwrap_err()[0].contains("`dev`: is a Char entry"));
    }

    #[test]
    fn size_and_count_limits_hold() {
        let limits = Limits {
            max_archive_bytes: 1 << 20,
            max_file_bytes: 4,
            max_total_bytes: 6,
            max_entries: 3,
            ..Limits::default()
        };
        let (_d, r) = unpack_bytes(&craft(&[file("big", b"12345")]), &limits);
        assert!(r.unwrap_err()[0].contains("over the limit of 4 bytes per file"));
        let (_d, r) = unpack_bytes(&craft(&[file("a", b"1234"), file("b", b"1234")]), &limits);
        assert!(r.unwrap_err()[0].contains("exceeds the limit of 6 bytes"));
        let many: Vec<_> = ["a", "b", "c", "d"].iter().map(|n| file(n, b"")).collect();
        let (_d, r) = unpack_bytes(&craft(&many), &limits);
        assert!(r.unwrap_err()[0].contains("more than 3 entries"));
        let archive = craft(&[file("a", b"1")]);
        let tight = Limits {
            max_archive_bytes: 10,
            ..limits
        };
        let (_d, r) = unpack_bytes(&archive, &tight);
        assert!(r.unwrap_err()[0].contains("larger than the limit of 10 bytes"));
    }

    /// A `.tar.gz` of one entry of `size` zero bytes (about 1000:1 compressed), then
    /// an empty file `after`.
    fn zeros(name: &str, size: u64, kind: tar::EntryType) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.set_cksum();
        b.append_data(&mut h, name, io::repeat(0).take(size))
            .unwrap();
        let mut after = tar::Header::new_gnu();
        after.set_size(0);
        after.set_mode(0o644);
        b.append_data(&mut after, "after", &b""[..]).unwrap();
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        // 256 MiB of zeros in one entry compresses to about 256 KiB.
        let bytes = zeros("bomb", 256 << 20, tar::EntryType::Regular);
        assert!(bytes.len() < 2 << 20);
        let limits = Limits {
            max_file_bytes: 1 << 20,
            ..Limits::default()
        };
        let (dir, r) = unpack_bytes(&bytes, &limits);
        assert!(r.unwrap_err()[0].contains("over the limit"));
        assert!(
            !dir.path().join("dest/bomb").exists(),
            "nothing of it was written"
        );
    }

    /// A raw tar header block of `kind` declaring `size` bytes (the data need not follow).
    fn raw_header(name: &str, kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.as_mut_bytes()[156] = kind;
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn metadata_headers_are_bounded_before_they_are_read() {
        for kind in [b'x', b'g', b'L', b'K'] {
            // Declares 1 GiB of PAX (or long-name) data, and sends 1 MiB of it.
            let mut tar = raw_header("././@PaxHeader", kind, 1 << 30);
            tar.extend(std::iter::repeat_n(b'a', 1 << 20));
            let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
            let reasons = r.unwrap_err();
            assert!(
                reasons[0].contains("of 1073741824 bytes; at most 65536"),
                "{reasons:?}"
            );
        }
        // A 65 KB long name within the bound is shown bounded.
        let long = "n".repeat(60_000);
        let mut pax = Vec::new();
        let record = format!("path={long}\n");
        let len = record.len() + 6; // "NNNNN " prefix, 5 digits and a space
        pax.extend(format!("{len} {record}").as_bytes());
        let mut tar = raw_header("pax", b'x', pax.len() as u64);
        tar.extend(&pax);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
        tar.extend(raw_header("ignored", b'3', 0)); // a char device, refused
        tar.extend([0u8; 1024]);
        let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
        let reasons = r.unwrap_err();
        let all = reasons.join("; ");
        assert!(all.len() < 400 && all.contains("(60000 bytes)"), "{all}");
    }

    #[test]
    fn long_names_in_gnu_and_pax_entries_pass_the_header_guard() {
        // `pack` writes GNU long-name entries for paths over 100 bytes; the guard must
        // follow the framing through them and the files' data.
        let src = tempfile::tempdir().unwrap();
        let deep = format!("assets/{}/{}", "d".repeat(120), "f".repeat(150));
        fs::create_dir_all(src.path().join(&deep).parent().unwrap()).unwrap();
        fs::write(src.path().join(&deep), vec![3u8; 70_000]).unwrap();
        fs::write(src.path().join("bundle.toml"), "[bundle]").unwrap();
        let mut a = Vec::new();
        pack(src.path(), &mut a, |_| {}).unwrap();
        let (dir, r) = unpack_bytes(&a, &Limits::default());
        r.unwrap();
        assert_eq!(
            fs::read(dir.path().join("dest").join(&deep)).unwrap().len(),
            70_000
        );
        // A PAX path record followed by its file.
        let mut pax = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        pax.append_pax_extensions([("path", deep.as_bytes())])
            .unwrap();
        h.set_path("short").unwrap();
        h.set_cksum();
        pax.append(&h, &b"hello"[..]).unwrap();
        let bytes = gzip(&pax.into_inner().unwrap());
        let (dir, r) = unpack_bytes(&bytes, &Limits::default());
        r.unwrap();
        assert_eq!(
            fs::read(dir.path().join("dest").join(&deep)).unwrap(),
            b"hello"
        );
    }

    /// A tar stream of raw blocks: headers made by [`raw_header`] and data padded to 512.
    fn blocks(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            out.extend(p);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend([0u8; 1024]);
        out
    }

    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    #[test]
    fn a_pax_size_record_cannot_move_the_framing_past_the_guard() {
        // A PAX `size` makes the crate read 1536 bytes of data for a header declaring 0;
        // inside them a fake header would send the guard 8 GiB ahead, and at the offset
        // the crate reads next, a 1 GiB PAX header.
        let record = pax_record("size", "1536");
        let mut fake = raw_header("fake", b'0', 0);
        fake[124..136].copy_from_slice(b"77777777777\0");
        let mut fake_h = tar::Header::new_old();
        fake_h.as_mut_bytes().copy_from_slice(&fake);
        fake_h.set_cksum();
        let tar = blocks(&[
            raw_header("pax", b'x', record.len() as u64),
            record,
            raw_header("bundle.toml", b'0', 0),
            fake_h.as_bytes().to_vec(),
            vec![0u8; 1024],
            raw_header("bomb", b'x', 1 << 30),
        ]);
        let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
        let reasons = r.unwrap_err();
        assert!(
            reasons[0].contains("framing is inconsistent"),
            "{reasons:?}"
        );
    }

    #[test]
    fn sparse_entries_are_refused_before_their_extension_blocks() {
        let mut h = raw_header("sparse", b'S', 0);
        h[482] = 1; // isextended: the crate would read a further 512-byte block
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(&h);
        header.set_cksum();
        let tar = blocks(&[
            header.as_bytes().to_vec(),
            vec![0u8; 512],
            raw_header("x", b'x', 1 << 30),
        ]);
        let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
        assert!(r.unwrap_err()[0].contains("sparse"));
    }

    #[test]
    fn hard_links_cannot_multiply_a_file_past_the_bounds() {
        let mut entries = vec![file("bundle.toml", b"x"), file("big", &[7u8; 4096])];
        let names: Vec<String> = (0..100).map(|i| format!("copy{i}")).collect();
        entries.extend(
            names
                .iter()
                .map(|n| (n.as_str(), tar::EntryType::Link, &b""[..], Some("big"))),
        );
        let limits = Limits {
            max_total_bytes: 40_000,
            ..Limits::default()
        };
        let (dir, r) = unpack_bytes(&craft(&entries), &limits);
        assert!(r.unwrap_err()[0].contains("hard links copy more"));
        let copies = fs::read_dir(dir.path().join("dest")).unwrap().count();
        assert!(copies < 12, "{copies} files");
    }

    #[test]
    fn skipped_data_counts_toward_the_ratio_bound() {
        // A directory entry with 48 MiB of data: the tar crate skips the data, which is
        // never written, and the decompressed stream stops at the ratio bound all the same.
        let bytes = zeros("dir/", 48 << 20, tar::EntryType::Directory);
        let limits = Limits {
            ratio_floor: 1 << 20,
            ..Limits::default()
        };
        let (_d, r) = unpack_bytes(&bytes, &limits);
        let reasons = r.unwrap_err();
        assert!(
            reasons.iter().any(|r| r.contains("more than 100 times")),
            "{reasons:?}"
        );
    }

    #[test]
    fn reasons_are_bounded_in_number() {
        let names: Vec<String> = (0..100).map(|i| format!("../x{i}")).collect();
        let entries: Vec<_> = names.iter().map(|n| file(n.as_str(), b"")).collect();
        let (_d, r) = unpack_bytes(&craft(&entries), &Limits::default());
        let reasons = r.unwrap_err();
        assert_eq!(reasons.len(), MAX_REASONS + 1);
        assert_eq!(reasons.last().unwrap(), "and 80 more problems");
    }

    #[test]
    fn a_highly_compressible_archive_stops_at_the_ratio() {
        // 48 MiB of zeros: under every size limit, but 1000:1.
        let bytes = zeros("zeros", 48 << 20, tar::EntryType::Regular);
        let limits = Limits {
            ratio_floor: 1 << 20,
            ..Limits::default()
        };
        let (dir, r) = unpack_bytes(&bytes, &limits);
        assert!(r.unwrap_err()[0].contains("more than 100 times"));
        let written = fs::metadata(dir.path().join("dest/zeros")).map_or(0, |m| m.len());
        // The bound counts compressed bytes as the decoder reads them, ahead of what it
        // has inflated by its input buffer (32 KiB here): 100 x that, past the floor.
        assert!(written <= 8 << 20, "{written} bytes written");
        // The same under the default floor of 64 MiB unpacks.
        let (_d, r) = unpack_bytes(&bytes, &Limits::default());
        r.unwrap();
    }

    #[test]
    fn the_start_of_an_upload_is_checked_before_it_is_spooled() {
        let good = craft(&[file("bundle.toml", b"x")]);
        assert_eq!(check_start(&good, true), Ok(Start::Tar));
        assert_eq!(check_start(&good[..10], false), Ok(Start::NeedMore));
        assert_eq!(check_start(&good[..1], false), Ok(Start::NeedMore));
        let not_gzip = check_start(b"PK\x03\x04 a zip", false).unwrap_err();
        assert!(not_gzip.contains("not a .tar.gz"), "{not_gzip}");
        let not_tar = check_start(&gzip(&[7u8; 4096]), true).unwrap_err();
        assert!(not_tar.contains("checksum"), "{not_tar}");
        let empty = check_start(&gzip(&[0u8; 1024]), true).unwrap_err();
        assert!(empty.contains("empty"), "{empty}");
        assert!(check_start(&gzip(b"short"), true).is_err());
    }

    #[test]
    fn pack_is_deterministic_and_round_trips_with_the_same_digest() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("model")).unwrap();
        fs::write(src.path().join("bundle.toml"), "[bundle]").unwrap();
        fs::write(src.path().join("model/model.pt"), vec![7u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("../bundle.toml", src.path().join("model/link")).unwrap();
        let mut a = Vec::new();
        pack(src.path(), &mut a, |_| {}).unwrap();
        // Touching mtimes changes nothing.
        let f = fs::File::options()
            .write(true)
            .open(src.path().join("bundle.toml"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
        let mut b = Vec::new();
        pack(src.path(), &mut b, |_| {}).unwrap();
        assert_eq!(a, b, "the same content packs to the same bytes");

        let (dir, r) = unpack_bytes(&a, &Limits::default());
        r.unwrap();
        assert_eq!(
            digest(&dir.path().join("dest")).unwrap(),
            digest(src.path()).unwrap()
        );
    }

    #[test]
    fn the_digest_ignores_how_the_archive_was_made() {
        // Same files, other order, other tar flavour and compression.
        let one = craft(&[
            file("bundle.toml", b"m"),
            file("model/a", b"1"),
            file("model/b", b"2"),
        ]);
        let two = craft(&[
            file("./model/b", b"2"),
            file("model/a", b"1"),
            file("bundle.toml", b"m"),
        ]);
        let (d1, r1) = unpack_bytes(&one, &Limits::default());
        let (d2, r2) = unpack_bytes(&two, &Limits::default());
        r1.unwrap();
        r2.unwrap();
        let (x, y) = (
            digest(&d1.path().join("dest")).unwrap(),
            digest(&d2.path().join("dest")).unwrap(),
        );
        assert_eq!(x, y);
        assert!(x.starts_with("sha256:") && x.len() == 7 + 64);
        fs::write(d2.path().join("dest/model/b"), b"3").unwrap();
        assert_ne!(
            digest(&d2.path().join("dest")).unwrap(),
            x,
            "content changes the digest"
        );
    }
}
