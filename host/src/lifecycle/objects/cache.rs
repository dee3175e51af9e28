//! Where a replica's cache lives, and its lock: two processes never share one.

use std::path::{Path, PathBuf};

/// The default cache directory for a repository URL: under `$XDG_CACHE_HOME` (or
/// `~/.cache`, or the temp directory) a directory per URL, and per process when several
/// replicas share a home: the first slot whose lock is free (`<dir>`, `<dir>.1`, ...).
/// A restart takes its slot back, and with it a valid cache.
pub fn default_cache_dir(url: &str) -> anyhow::Result<(PathBuf, std::fs::File)> {
    use sha2::Digest;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("nnserve");
    let hash = sha2::Sha256::digest(url.as_bytes());
    let readable: String = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    let name = format!(
        "{readable}-{:02x}{:02x}{:02x}{:02x}",
        hash[0], hash[1], hash[2], hash[3]
    );
    for slot in 0..64 {
        let dir = if slot == 0 {
            base.join(&name)
        } else {
            base.join(format!("{name}.{slot}"))
        };
        if let Some(lock) = lock_cache(&dir)? {
            return Ok((dir, lock));
        }
    }
    anyhow::bail!(
        "64 replicas use the caches of {url} under {}; pass --cache-dir",
        base.display()
    )
}

/// Takes the cache directory's lock; `None` when another process holds it.
pub fn lock_cache(dir: &Path) -> anyhow::Result<Option<std::fs::File>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the cache {}: {e}", dir.display()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(|e| anyhow::anyhow!("cannot lock the cache {}: {e}", dir.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock the cache {}: {e}", dir.display())
        }
    }
}
