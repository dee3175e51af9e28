//! Where bundles live: a local directory `<repo>/<model>/<version>/bundle.toml`.
//!
//! This module lists what the repository holds; it does not load anything. Entries
//! whose directory names are not a model name and a positive version are reported,
//! not skipped silently.

use std::path::{Path, PathBuf};

/// A version directory found in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub model: String,
    pub version: u64,
    pub dir: PathBuf,
}

/// Something in the repository that is not a loadable version directory.
#[derive(Debug, Clone)]
pub struct Problem {
    pub path: PathBuf,
    pub reason: String,
}

/// Lists every `<model>/<version>/` under `root`, sorted by model then version.
pub fn scan(root: &Path) -> anyhow::Result<(Vec<Entry>, Vec<Problem>)> {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let models = std::fs::read_dir(root).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the repository {}: {e} (create it, or pass --repository DIR)",
            root.display()
        )
    })?;
    for model in models {
        let model = model?;
        if !model.file_type()?.is_dir() || model.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let name = model.file_name().to_string_lossy().into_owned();
        if !crate::bundle::valid_name(&name) {
            problems.push(Problem {
                path: model.path(),
                reason: format!("{name:?} is not a valid model name ([a-z0-9][a-z0-9._-]*)"),
            });
            continue;
        }
        for version in std::fs::read_dir(model.path())? {
            let version = version?;
            let vname = version.file_name().to_string_lossy().into_owned();
            if !version.file_type()?.is_dir() || vname.starts_with('.') {
                continue;
            }
            match vname.parse::<u64>() {
                Ok(v) if v > 0 && !vname.starts_with('0') => entries.push(Entry {
                    model: name.clone(),
                    version: v,
                    dir: version.path(),
                }),
                _ => problems.push(Problem {
                    path: version.path(),
                    reason: format!("{vname:?} is not a version number (a positive integer)"),
                }),
            }
        }
    }
    entries.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
    Ok((entries, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_models_and_versions_and_reports_strays() {
        let dir = tempfile::tempdir().unwrap();
        for p in [
            "mlp/1",
            "mlp/2",
            "digits/1",
            "mlp/latest",
            "Bad/1",
            ".hidden/1",
        ] {
            std::fs::create_dir_all(dir.path().join(p)).unwrap();
        }
        let (entries, problems) = scan(dir.path()).unwrap();
        let got: Vec<(String, u64)> = entries
            .iter()
            .map(|e| (e.model.clone(), e.version))
            .collect();
        assert_eq!(
            got,
            vec![("digits".into(), 1), ("mlp".into(), 1), ("mlp".into(), 2)]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn a_missing_repository_says_what_to_do() {
        let err = scan(Path::new("/nonexistent/repo"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--repository"), "{err}");
    }
}

/// What the server records about a stored version, kept beside the version directories
/// (`<repo>/<model>/.meta/<version>.json`), never inside them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VersionMeta {
    pub digest: String,
    /// Bytes of the unpacked files.
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub uploaded_at: u64,
}

fn meta_path(root: &Path, model: &str, version: u64) -> PathBuf {
    root.join(model)
        .join(".meta")
        .join(format!("{version}.json"))
}

/// Writes a version's record atomically (write, then rename).
fn write_meta(root: &Path, model: &str, version: u64, meta: &VersionMeta) -> std::io::Result<()> {
    let path = meta_path(root, model, version);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(meta)?)?;
    std::fs::rename(&tmp, &path)
}

pub fn read_meta(root: &Path, model: &str, version: u64) -> Option<VersionMeta> {
    let text = std::fs::read(meta_path(root, model, version)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// A scratch directory inside the repository (same file system, so that the final
/// rename is atomic). Removed when dropped; leftovers of a crash are ignored by `scan`
/// (hidden) and cleared at start-up.
pub fn scratch(root: &Path) -> std::io::Result<tempfile::TempDir> {
    let area = root.join(".tmp");
    std::fs::create_dir_all(&area)?;
    tempfile::Builder::new().prefix("upload-").tempdir_in(area)
}

/// Removes what interrupted uploads left in the scratch area.
pub fn clear_scratch(root: &Path) {
    let _ = std::fs::remove_dir_all(root.join(".tmp"));
}

/// Moves an unpacked, checked bundle into `<repo>/<model>/<version>/` with one rename,
/// after writing its metadata. A crash before the rename leaves the old state; after it,
/// the new one.
pub fn install(
    root: &Path,
    model: &str,
    version: u64,
    unpacked: &Path,
    meta: &VersionMeta,
) -> std::io::Result<PathBuf> {
    write_meta(root, model, version, meta)?;
    let target = root.join(model).join(version.to_string());
    std::fs::rename(unpacked, &target)?;
    sync_dir(&root.join(model));
    Ok(target)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn labels_path(root: &Path, model: &str) -> PathBuf {
    root.join(model).join(".meta").join("labels.json")
}

/// A model's labels (label to version), as last stored.
pub fn read_labels(root: &Path, model: &str) -> std::collections::BTreeMap<String, u64> {
    std::fs::read(labels_path(root, model))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default()
}

/// Stores a model's labels atomically (write, then rename).
pub fn write_labels(
    root: &Path,
    model: &str,
    labels: &std::collections::BTreeMap<String, u64>,
) -> std::io::Result<()> {
    let path = labels_path(root, model);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(labels)?)?;
    std::fs::rename(&tmp, &path)
}

/// Removes a stored version: renamed into the scratch area first (one step, so it is
/// never half-present), then deleted with its record.
pub fn remove(root: &Path, model: &str, version: u64) -> std::io::Result<()> {
    let dir = root.join(model).join(version.to_string());
    let area = root.join(".tmp");
    std::fs::create_dir_all(&area)?;
    let gone = area.join(format!("deleted-{model}-{version}-{}", std::process::id()));
    std::fs::rename(&dir, &gone)?;
    let _ = std::fs::remove_file(meta_path(root, model, version));
    std::fs::remove_dir_all(gone)
}

/// Records digest, size and first-seen time for a version that has no record yet (one
/// copied in by hand), so it is listed and re-uploads of it are idempotent.
pub fn ensure_meta(root: &Path, model: &str, version: u64, dir: &Path) {
    if read_meta(root, model, version).is_some() {
        return;
    }
    let (Ok(digest), Ok(files)) = (crate::archive::digest(dir), crate::archive::list_files(dir))
    else {
        return;
    };
    let meta = VersionMeta {
        digest,
        size: files.iter().map(|(_, m)| m.len()).sum(),
        uploaded_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    if let Err(e) = write_meta(root, model, version, &meta) {
        tracing::warn!(model, version, "cannot record the version's digest: {e}");
    }
}
