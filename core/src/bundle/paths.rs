//! Paths inside a bundle: a manifest's relative path is checked for what climbs out
//! ([`relative_path`]), and resolved against the bundle's directory with symlinks
//! followed only while they stay inside ([`resolve_inside`]).

use std::path::{Component, Path, PathBuf};

/// Checks that a manifest path is relative and never climbs out (`..`).
pub fn relative_path(p: &str) -> Result<&Path, String> {
    let path = Path::new(p);
    if p.is_empty() {
        return Err("the path is empty".into());
    }
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err("`..` is not allowed: paths stay inside the bundle".into())
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("must be relative to the bundle root".into())
            }
        }
    }
    Ok(path)
}

/// Resolves a manifest path and makes sure that, symlinks followed, it stays in `root`.
pub fn resolve_inside(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let rel = relative_path(rel)?;
    let root = root
        .canonicalize()
        .map_err(|e| format!("cannot resolve the bundle directory: {e}"))?;
    let full = root.join(rel);
    match full.canonicalize() {
        Ok(real) if real.starts_with(&root) => Ok(real),
        Ok(_) => Err("resolves outside the bundle (a symlink out is not allowed)".into()),
        // Missing files are reported by the caller, which knows what it expected.
        Err(_) => Ok(full),
    }
}
