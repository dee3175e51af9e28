//! What a repository holds, as the manager sees it: the versions stored for a model,
//! whether a version directory has changed, and the writes an upload, a label or a
//! delete makes. Today the source is a local directory (`repository` holds its file
//! layout and path rules); an object store becomes a second source behind the same
//! calls.
//!
//! This module reads and writes files; it never loads a model or touches the registry.

use crate::repository::{self, Entry, Problem, VersionMeta};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A version directory's shape: every file with its size and modification time. Two
/// equal fingerprints a poll interval apart mean a copy by hand has finished.
pub type Fingerprint = Vec<(String, u64, Option<std::time::SystemTime>)>;

/// A repository in a local directory: `<root>/<model>/<version>/`.
#[derive(Debug, Clone)]
pub struct LocalSource {
    pub root: PathBuf,
}

impl LocalSource {
    pub fn new(root: impl Into<PathBuf>) -> LocalSource {
        LocalSource { root: root.into() }
    }

    /// Every version of every model, and what is not a version directory.
    pub fn scan(&self) -> anyhow::Result<(Vec<Entry>, Vec<Problem>)> {
        repository::scan(&self.root)
    }

    /// The version directories of one model on disk now.
    pub fn versions(&self, model: &str) -> BTreeMap<u64, Entry> {
        repository::scan_model(&self.root, model)
            .into_iter()
            .map(|e| (e.version, e))
            .collect()
    }

    /// Whether `<repo>/<model>/<version>/` exists (false for a name that is not valid).
    pub fn is_stored(&self, model: &str, version: u64) -> bool {
        repository::version_dir(&self.root, model, version).is_ok_and(|d| d.is_dir())
    }

    pub fn fingerprint(dir: &Path) -> Option<Fingerprint> {
        let files = crate::archive::list_files(dir).ok()?;
        Some(
            files
                .into_iter()
                .map(|(p, m)| (p, m.len(), m.modified().ok()))
                .collect(),
        )
    }

    pub fn meta(&self, model: &str, version: u64) -> Option<VersionMeta> {
        repository::read_meta(&self.root, model, version)
    }

    pub fn labels(&self, model: &str) -> BTreeMap<String, u64> {
        repository::read_labels(&self.root, model)
    }

    pub fn write_labels(&self, model: &str, labels: &BTreeMap<String, u64>) -> std::io::Result<()> {
        repository::write_labels(&self.root, model, labels)
    }

    /// Moves a checked bundle in with one rename and records it; the version's new
    /// directory.
    pub fn install(
        &self,
        model: &str,
        version: u64,
        unpacked: &Path,
        meta: &VersionMeta,
    ) -> std::io::Result<PathBuf> {
        repository::install(&self.root, model, version, unpacked, meta)
    }

    /// Records digest, size and first-seen time for a version that has none (one copied
    /// in by hand), so it is listed with its digest and re-uploads of it are idempotent.
    pub fn ensure_meta(&self, model: &str, version: u64, dir: &Path, refresh: bool) {
        repository::ensure_meta(&self.root, model, version, dir, refresh)
    }

    pub fn remove(&self, model: &str, version: u64) -> std::io::Result<()> {
        repository::remove(&self.root, model, version)
    }

    /// A scratch directory on the repository's file system (for an upload's unpack).
    pub fn scratch(&self) -> std::io::Result<tempfile::TempDir> {
        repository::scratch(&self.root)
    }

    /// Removes what interrupted uploads left behind.
    pub fn clear_scratch(&self) {
        repository::clear_scratch(&self.root)
    }
}
