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

//!
//! Here: the [`Limits`]. Beside it, `start` (what an upload's first bytes say), `unpack`
//! (entries and where they may go), `guard` (the byte stream's bounds, below the `tar`
//! crate) and `digest` (listing, digest and packing). It knows files and bytes only: it
//! must not reach into `bundle` (what the files mean) or any module that serves; of the
//! crate it uses only `names`, to show untrusted names back.

mod digest;
mod guard;
mod start;
mod unpack;

pub use self::digest::{digest, list_files, pack};
pub use self::start::{check_start, Start, START_BYTES};
pub use self::unpack::{unpack, Unpacked};

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

#[cfg(test)]
mod tests;
