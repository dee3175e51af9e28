//! The bundle: its manifest (`bundle.toml`), the rules it must follow, and opening an
//! unpacked bundle directory. The schema is documented in `docs/bundle.md`.
//!
//! This module only reads and checks; loading models and compiling plugins belong to
//! `backend` and `plugin`. Every check reports all its reasons, not only the first. It is
//! shared vocabulary: it must not reach into any module that serves (`lifecycle`, `nn`,
//! `plugin`, `api`, ...), only into `names` and `tensor`.
//!
//! Here: [`Bundle`] (opening a directory: the manifest, then the files it names) and its
//! warmup requests. Beside it, `manifest` (the schema and parsing), `checks` (the rules a
//! manifest must follow) and `paths` (paths that stay inside the bundle).

mod checks;
mod manifest;
mod paths;

pub use self::manifest::{
    parse_manifest, BackendKind, BatchingSpec, BundleInfo, Dependency, DeviceSpec, EndpointSpec,
    Manifest, ModelSpec, Pin, PluginLimits, PluginSpec, RouterErrorPolicy, TensorSpec, VariantSpec,
    MAX_BATCH_INPUT_BYTES,
};
pub use self::paths::{relative_path, resolve_inside};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// A bundle that failed its checks: where, and every reason.
#[derive(Debug, Clone)]
pub struct BundleError {
    pub path: PathBuf,
    pub reasons: Vec<String>,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid bundle {}: {}",
            self.path.display(),
            self.reasons.join("; ")
        )
    }
}

impl std::error::Error for BundleError {}

/// Whether `dir` holds a version: a `bundle.toml`, or a SavedModel as TF Serving lays one
/// out (`<model>/<version>/saved_model.pb`, no manifest).
pub fn is_version_dir(dir: &Path) -> bool {
    dir.join("bundle.toml").is_file() || dir.join("saved_model.pb").is_file()
}

/// The manifest of a TF Serving version directory (`<model>/<version>/saved_model.pb`
/// and no `bundle.toml`): a tensorflow model with every default, its name and version
/// from the directory names, the SavedModel being the directory itself. `None` when
/// `dir` has a `bundle.toml` or no `saved_model.pb`.
fn tf_serving_manifest(dir: &Path) -> Option<Result<String, String>> {
    if dir.join("bundle.toml").exists() || !dir.join("saved_model.pb").is_file() {
        return None;
    }
    let name_of = |p: Option<&Path>| {
        p.and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let version = name_of(Some(dir));
    let model = name_of(dir.parent());
    let checked = crate::names::check_name("model name", &model)
        .and_then(|_| crate::names::parse_version(&version));
    Some(match checked {
        Ok(v) => Ok(format!(
            "[bundle]\nname = \"{model}\"\nversion = {v}\n\n[model]\nbackend = \"tensorflow\"\npath = \".\"\n"
        )),
        Err(e) => Err(format!(
            "a SavedModel without bundle.toml is served as TF Serving lays it out, in <model>/<version>/saved_model.pb: {e}"
        )),
    })
}

/// An unpacked bundle whose manifest passed its checks.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    /// Reads and checks `dir/bundle.toml` and the files it names.
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        let fail = |reasons: Vec<String>| BundleError {
            path: dir.to_path_buf(),
            reasons,
        };
        let text = match tf_serving_manifest(dir) {
            Some(text) => text.map_err(|e| fail(vec![e]))?,
            None => std::fs::read_to_string(dir.join("bundle.toml"))
                .map_err(|e| fail(vec![format!("cannot read bundle.toml: {e}")]))?,
        };
        let manifest = parse_manifest(&text).map_err(|r| fail(vec![r]))?;
        let mut reasons = manifest.check();
        let mut check_file = |what: &str, rel: &str| match resolve_inside(dir, rel) {
            Ok(p) if p.is_file() => {}
            Ok(_) => reasons.push(format!("{what} `{rel}` does not exist in the bundle")),
            Err(e) => reasons.push(format!("{what} `{rel}`: {e}")),
        };
        if let Some(m) = &manifest.model {
            let path_ok = resolve_inside(dir, &m.path);
            match (m.backend, path_ok) {
                // A SavedModel is a directory.
                (BackendKind::Tensorflow, Ok(p)) if p.is_dir() => {}
                _ => check_file("model.path", &m.path),
            }
        }
        if let Some(h) = &manifest.handler {
            check_file("handler.path", &h.path);
        }
        if let Some(rt) = &manifest.router {
            check_file("router.path", &rt.path);
        }
        if reasons.is_empty() {
            Ok(Bundle {
                dir: dir.to_path_buf(),
                manifest,
            })
        } else {
            Err(fail(reasons))
        }
    }

    pub fn name(&self) -> &str {
        &self.manifest.bundle.name
    }

    pub fn version(&self) -> u64 {
        self.manifest.bundle.version
    }

    /// A path the manifest names, resolved inside the bundle (checked at open).
    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The requests in `warmup/*.json`, in file-name order.
    pub fn warmup_requests(&self) -> Result<Vec<(String, WarmupRequest)>, String> {
        let dir = self.dir.join("warmup");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let name = format!(
                    "warmup/{}",
                    p.file_name().unwrap_or_default().to_string_lossy()
                );
                let text = std::fs::read(&p).map_err(|e| format!("{name}: {e}"))?;
                let req: WarmupRequest = serde_json::from_slice(&text).map_err(|e| {
                    format!("{name} is not a warm-up request {{route, content_type, body}}: {e}")
                })?;
                Ok((name, req))
            })
            .collect()
    }
}

/// A request replayed through the real request path before a version becomes
/// AVAILABLE. The model and version in `route` are ignored: it goes to the version being
/// loaded. `body`: a string is sent as is, any other JSON value as JSON text;
/// `body_base64` carries binary bodies (an image).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupRequest {
    pub route: String,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    #[serde(default)]
    pub body_base64: Option<String>,
}

impl WarmupRequest {
    pub fn body_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.body, &self.body_base64) {
            (Some(serde_json::Value::String(s)), None) => Ok(s.clone().into_bytes()),
            (Some(v), None) => Ok(v.to_string().into_bytes()),
            (None, Some(b)) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .map_err(|e| format!("body_base64 is not base64: {e}"))
            }
            (None, None) => Ok(Vec::new()),
            (Some(_), Some(_)) => Err("give either body or body_base64, not both".into()),
        }
    }
}

pub use crate::names::valid_name;

#[cfg(test)]
mod tests;
