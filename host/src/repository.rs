//! The local repository's file layout: version directories
//! `<repo>/<model>/<version>/bundle.toml`, the records beside them
//! (`<repo>/<model>/.meta/`: digest and upload time per version, labels) and the scratch
//! area uploads unpack in (`<repo>/.tmp`), with the writes that keep them consistent
//! (install by one rename, remove by one rename out).
//!
//! It lists and writes files; it never loads anything or decides what serves (that is
//! `lifecycle`, whose `source` wraps it). Entries whose directory names are not a model
//! name and a positive version are reported, not skipped silently.
//!
//! Every path the server reads, writes or removes in the repository is made by
//! [`model_dir`] or [`version_dir`], which check the model name and the version
//! (`names`) and prove the result lies inside the repository: a name from a URL such as
//! `..` never reaches the file system.

use std::io;
use std::path::{Component, Path, PathBuf};

/// `<root>/<model>`, for a valid model name only.
pub fn model_dir(root: &Path, model: &str) -> io::Result<PathBuf> {
    crate::names::check_name("model name", model)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    inside(root, root.join(model))
}

/// `<root>/<model>/<version>`, for a valid model name and version only.
pub fn version_dir(root: &Path, model: &str, version: u64) -> io::Result<PathBuf> {
    crate::names::check_version(version)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    inside(root, model_dir(root, model)?.join(version.to_string()))
}

/// `path` when it is `root` followed by plain components only (no `..`, no root, no
/// prefix): the proof, independent of how the names were checked, that nothing this
/// module makes climbs out.
fn inside(root: &Path, path: PathBuf) -> io::Result<PathBuf> {
    let plain = path
        .strip_prefix(root)
        .is_ok_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))));
    if plain {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path would leave the repository",
        ))
    }
}

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

/// A directory, or a symlink to one: a version directory may be a link (the view of
/// `single_model`, or a tree an operator links together).
fn is_dir(entry: &std::fs::DirEntry) -> bool {
    match entry.file_type() {
        Ok(t) if t.is_symlink() => entry.path().is_dir(),
        Ok(t) => t.is_dir(),
        Err(_) => false,
    }
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
        if let Err(reason) = crate::names::check_name("model name", &name) {
            problems.push(Problem {
                path: model.path(),
                reason,
            });
            continue;
        }
        for version in std::fs::read_dir(model.path())? {
            let version = version?;
            let vname = version.file_name().to_string_lossy().into_owned();
            if !is_dir(&version) || vname.starts_with('.') {
                continue;
            }
            match crate::names::parse_version(&vname) {
                Ok(v) => entries.push(Entry {
                    model: name.clone(),
                    version: v,
                    dir: version.path(),
                }),
                Err(reason) => problems.push(Problem {
                    path: version.path(),
                    reason,
                }),
            }
        }
    }
    entries.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
    Ok((entries, problems))
}

/// The version directories of one model, lowest first; none for a name that is not
/// valid or a model that is not there. Strays are left to [`scan`] to report.
pub fn scan_model(root: &Path, model: &str) -> Vec<Entry> {
    let Ok(dir) = model_dir(root, model) else {
        return Vec::new();
    };
    let Ok(read) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut entries: Vec<Entry> = read
        .flatten()
        .filter(is_dir)
        .filter_map(|v| {
            let name = v.file_name().to_string_lossy().into_owned();
            let version = crate::names::parse_version(&name).ok()?;
            Some(Entry {
                model: model.to_string(),
                version,
                dir: v.path(),
            })
        })
        .collect();
    entries.sort_by_key(|e| e.version);
    entries
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
            "mlp/9223372036854775808",
            "ResNet50/3",
            "bad name/1",
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
            vec![
                ("ResNet50".into(), 3),
                ("digits".into(), 1),
                ("mlp".into(), 1),
                ("mlp".into(), 2)
            ]
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn paths_from_names_never_leave_the_repository() {
        let root = Path::new("/srv/repo");
        assert_eq!(
            version_dir(root, "mlp", 3).unwrap(),
            Path::new("/srv/repo/mlp/3")
        );
        for bad in ["..", ".", "", "a/b", "../x", "/etc", ".meta", "a\\b"] {
            assert!(model_dir(root, bad).is_err(), "{bad:?}");
            assert!(version_dir(root, bad, 1).is_err(), "{bad:?}");
        }
        assert!(version_dir(root, "mlp", 0).is_err());
        assert!(version_dir(root, "mlp", u64::MAX).is_err());
        assert!(inside(root, root.join("a/../..")).is_err());
        // Every writer goes through them.
        let dir = tempfile::tempdir().unwrap();
        let labels = std::collections::BTreeMap::from([("x".to_string(), 1)]);
        assert!(write_labels(dir.path(), "..", &labels).is_err());
        assert!(remove(dir.path(), "..", 7).is_err());
        let meta = VersionMeta {
            digest: "d".into(),
            size: 0,
            uploaded_at: 0,
        };
        assert!(install(dir.path(), "..", 1, dir.path(), &meta).is_err());
        assert!(read_meta(dir.path(), "..", 1).is_none());
    }

    #[test]
    fn install_makes_the_model_directory_and_records_after_the_rename() {
        let root = tempfile::tempdir().unwrap();
        let unpacked = root.path().join("unpacked");
        std::fs::create_dir(&unpacked).unwrap();
        std::fs::write(unpacked.join("bundle.toml"), "x").unwrap();
        let meta = VersionMeta {
            digest: "sha256:x".into(),
            size: 1,
            uploaded_at: 0,
        };
        let dir = install(root.path(), "fresh", 3, &unpacked, &meta).unwrap();
        assert_eq!(dir, root.path().join("fresh/3"));
        assert!(dir.join("bundle.toml").is_file());
        assert_eq!(read_meta(root.path(), "fresh", 3), Some(meta));
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

fn meta_path(root: &Path, model: &str, version: u64) -> io::Result<PathBuf> {
    crate::names::check_version(version)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(model_dir(root, model)?
        .join(".meta")
        .join(format!("{version}.json")))
}

/// Writes a version's record atomically (write, then rename).
fn write_meta(root: &Path, model: &str, version: u64, meta: &VersionMeta) -> std::io::Result<()> {
    let path = meta_path(root, model, version)?;
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(meta)?)?;
    std::fs::rename(&tmp, &path)
}

pub fn read_meta(root: &Path, model: &str, version: u64) -> Option<VersionMeta> {
    let text = std::fs::read(meta_path(root, model, version).ok()?).ok()?;
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
/// then writes its record. A crash before the rename leaves the old state; after it,
/// the new one.
pub fn install(
    root: &Path,
    model: &str,
    version: u64,
    unpacked: &Path,
    meta: &VersionMeta,
) -> std::io::Result<PathBuf> {
    let target = version_dir(root, model, version)?;
    std::fs::create_dir_all(model_dir(root, model)?)?;
    std::fs::rename(unpacked, &target)?;
    sync_dir(&model_dir(root, model)?);
    // After the rename: a record never exists without its version (a crash between the
    // two leaves a version without one, which `ensure_meta` records at its next load).
    write_meta(root, model, version, meta)?;
    Ok(target)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn labels_path(root: &Path, model: &str) -> io::Result<PathBuf> {
    Ok(model_dir(root, model)?.join(".meta").join("labels.json"))
}

/// A model's labels (label to version), as last stored.
pub fn read_labels(root: &Path, model: &str) -> std::collections::BTreeMap<String, u64> {
    labels_path(root, model)
        .and_then(std::fs::read)
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
    let path = labels_path(root, model)?;
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(labels)?)?;
    std::fs::rename(&tmp, &path)
}

/// Removes a stored version: renamed into the scratch area first (one step, so it is
/// never half-present), then deleted with its record.
pub fn remove(root: &Path, model: &str, version: u64) -> std::io::Result<()> {
    let dir = version_dir(root, model, version)?;
    let meta = meta_path(root, model, version)?;
    let area = root.join(".tmp");
    std::fs::create_dir_all(&area)?;
    let gone = area.join(format!("deleted-{model}-{version}-{}", std::process::id()));
    std::fs::rename(&dir, &gone)?;
    let _ = std::fs::remove_file(meta);
    std::fs::remove_dir_all(gone)
}

/// Whether a file of the version was changed after its record was written (files edited
/// by hand in place): the record's digest is then the old files'. A file as new as its
/// record counts too (a file system whose times are coarse cannot tell them apart): at
/// worst a version is hashed once more.
fn stale_meta(root: &Path, model: &str, version: u64, dir: &Path) -> bool {
    let Some(recorded) = meta_path(root, model, version)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
    else {
        return false;
    };
    crate::archive::list_files(dir).is_ok_and(|files| {
        files
            .iter()
            .any(|(_, m)| m.modified().is_ok_and(|t| t >= recorded))
    })
}

/// Records digest, size and first-seen time for a version that has no record yet (one
/// copied in by hand), so it is listed and re-uploads of it are idempotent; and again
/// for one whose files were edited in place after its record was written.
///
/// `refresh`: whether a stale record is rewritten (a local repository; an object store's
/// cache holds the bucket's records, which only the bucket changes).
pub fn ensure_meta(root: &Path, model: &str, version: u64, dir: &Path, refresh: bool) {
    if read_meta(root, model, version).is_some()
        && !(refresh && stale_meta(root, model, version, dir))
    {
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
