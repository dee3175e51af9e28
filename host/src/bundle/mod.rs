//! The bundle: its manifest (`bundle.toml`), the rules it must follow, and opening an
//! unpacked bundle directory. The schema is documented in `docs/bundle.md`.
//!
//! This module only reads and checks; loading models and compiling plugins belong to
//! `backend` and `plugin`. Every check reports all its reasons, not only the first.

use crate::tensor::DType;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The parsed `bundle.toml`. Unknown fields are errors that name them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub bundle: BundleInfo,
    pub model: Option<ModelSpec>,
    pub batching: Option<BatchingSpec>,
    pub handler: Option<PluginSpec>,
    /// An endpoint bundle: variants behind a router, no model.
    pub endpoint: Option<EndpointSpec>,
    #[serde(default)]
    pub variants: Vec<VariantSpec>,
    pub router: Option<PluginSpec>,
}

/// `[endpoint]` of an endpoint bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The header whose value is the routing key (sticky routing), e.g. `x-user-id`.
    #[serde(default)]
    pub routing_key_header: Option<String>,
    /// What happens when the router traps, overruns its budget or names an unknown
    /// variant: serve the default variant (`fail-open`) or answer 503 (`fail-closed`).
    #[serde(default)]
    pub on_router_error: RouterErrorPolicy,
    /// The variant that answers when the router fails open, and whose model answers the
    /// endpoint's metadata and ready routes. Default: the first variant.
    #[serde(default)]
    pub default_variant: Option<String>,
    /// The window of the live stats handed to the router, ms.
    #[serde(default = "default_stats_window_ms")]
    pub stats_window_ms: u64,
}

fn default_stats_window_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterErrorPolicy {
    #[default]
    FailOpen,
    FailClosed,
}

impl RouterErrorPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterErrorPolicy::FailOpen => "fail-open",
            RouterErrorPolicy::FailClosed => "fail-closed",
        }
    }
}

/// One `[[variants]]` entry: a model, optionally pinned to a version or a label.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    /// The name the router sees; default: the model name. Two variants of one model
    /// (e.g. its `stable` and `canary` labels) need names of their own.
    #[serde(default)]
    pub name: Option<String>,
    pub model: String,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl VariantSpec {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.model)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleInfo {
    /// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 characters (`names::valid_name`).
    pub name: String,
    /// A positive integer, monotonic per name.
    pub version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Torchscript,
    Tensorflow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub backend: BackendKind,
    /// Relative to the bundle root, e.g. `model/model.pt`.
    pub path: String,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
}

fn default_device() -> String {
    "auto".to_string()
}

/// A named tensor of the model's signature; `-1` in `shape` is any size (dim 0 is the
/// batch dimension).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

/// TF Serving's batching parameters (see `docs/bundle.md`), used by `batching`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingSpec {
    pub max_batch_size: u32,
    #[serde(default)]
    pub batch_timeout_micros: u64,
    #[serde(default)]
    pub allowed_batch_sizes: Vec<u32>,
    #[serde(default = "default_max_enqueued")]
    pub max_enqueued_batches: u32,
    /// Batches run at once. Absent: chosen by the server at load (1, or one per core for a
    /// compute-bound model on the CPU; `backend::threading`).
    #[serde(default)]
    pub num_batch_threads: Option<u32>,
}

fn default_max_enqueued() -> u32 {
    64
}

/// A plugin section (`[handler]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Relative to the bundle root, e.g. `plugins/handler.wasm`.
    pub path: String,
    /// Values handed to the plugin through `host.config`; scalars are turned into strings.
    #[serde(default, deserialize_with = "scalar_map")]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: PluginLimits,
}

/// The plugin's own budget per request.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Linear memory cap, MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Guest CPU time, ms: counted only while plugin code runs (not during `compute`).
    #[serde(default = "default_cpu_ms")]
    pub cpu_ms: u64,
    /// Host memory the plugin's wasi-nn resources may hold at once (the tensors it
    /// creates, a model's outputs), MiB. Default: `memory_mib`.
    #[serde(default)]
    pub host_memory_mib: Option<u64>,
}

impl PluginLimits {
    /// `host_memory_mib`, or its default.
    pub fn host_memory_mib(&self) -> u64 {
        self.host_memory_mib.unwrap_or(self.memory_mib)
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory_mib: default_memory_mib(),
            cpu_ms: default_cpu_ms(),
            host_memory_mib: None,
        }
    }
}

fn default_memory_mib() -> u64 {
    64
}
fn default_cpu_ms() -> u64 {
    100
}

fn scalar_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, toml::Value> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let s = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "config value `{k}` must be a string, number or boolean, got {}",
                        other.type_str()
                    )))
                }
            };
            Ok((k, s))
        })
        .collect()
}

/// Where a model runs, from the manifest's `device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when available, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("device {s:?} is not one of auto, cpu, cuda, cuda:N")),
        }
    }
}

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
        let text = std::fs::read_to_string(dir.join("bundle.toml"))
            .map_err(|e| fail(vec![format!("cannot read bundle.toml: {e}")]))?;
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

/// Parses a manifest; the error names the field and line, as the TOML parser reports.
/// The most bytes one input of one batch may take, checked at validation (the largest
/// batch, `max_batch_size` rows, is also what a version warms up with). 1 GiB holds, for
/// example, 1,365 RGB images of 224x224 or 341 of 512x512 in fp32.
pub const MAX_BATCH_INPUT_BYTES: usize = 1 << 30;

pub fn parse_manifest(text: &str) -> Result<Manifest, String> {
    toml::from_str(text).map_err(|e| {
        // One line that names the place: the parser's own rendering spans several, with
        // the source line and a caret under it.
        let line = e.span().map(|s| {
            text.as_bytes()[..s.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        let message = e.message().trim_end().replace('\n', " ");
        match line {
            Some(n) => format!("bundle.toml line {n}: {message}"),
            None => format!("bundle.toml: {message}"),
        }
    })
}

pub use crate::names::valid_name;

impl Manifest {
    /// Checks that do not touch the file system. Returns every reason found.
    pub fn check(&self) -> Vec<String> {
        let mut r = Vec::new();
        if let Err(e) = crate::names::check_name("bundle.name", &self.bundle.name) {
            r.push(e);
        }
        if let Err(e) = crate::names::check_version(self.bundle.version) {
            r.push(format!("bundle.version: {e}"));
        }
        if self.endpoint.is_some() || self.router.is_some() || !self.variants.is_empty() {
            self.check_endpoint(&mut r);
        } else if self.model.is_none() {
            r.push(
                "a [model] section is required (or, for an endpoint bundle, [endpoint], [[variants]] and [router])"
                    .to_string(),
            );
        }
        match &self.model {
            None => {}
            Some(m) => {
                if let Err(e) = DeviceSpec::parse(&m.device) {
                    r.push(format!("model.device: {e}"));
                }
                if m.backend == BackendKind::Tensorflow {
                    r.push(
                        "model.backend \"tensorflow\" is not available in this build yet; use \"torchscript\""
                            .to_string(),
                    );
                }
                for (kind, list) in [("inputs", &m.inputs), ("outputs", &m.outputs)] {
                    let mut seen = std::collections::HashSet::new();
                    for t in list.iter() {
                        if t.name.is_empty() {
                            r.push(format!("model.{kind}: a tensor name is empty"));
                        }
                        if !seen.insert(&t.name) {
                            r.push(format!("model.{kind}: the name '{}' appears twice", t.name));
                        }
                        if t.shape.iter().any(|&d| d < -1 || d == 0) {
                            r.push(format!(
                                "model.{kind} '{}': shape {:?} may hold only positive sizes and -1",
                                t.name, t.shape
                            ));
                        }
                    }
                }
                if m.inputs.is_empty() && self.handler.is_none() {
                    r.push(
                        "model.inputs is empty: the tensor APIs need the model's inputs (name, dtype, shape)"
                            .to_string(),
                    );
                }
            }
        }
        if let Some(b) = &self.batching {
            if b.max_batch_size == 0 {
                r.push("batching.max_batch_size must be at least 1".to_string());
            }
            if let Some(&last) = b.allowed_batch_sizes.last() {
                if !b.allowed_batch_sizes.windows(2).all(|w| w[0] < w[1]) {
                    r.push("batching.allowed_batch_sizes must be increasing".to_string());
                }
                if last != b.max_batch_size {
                    r.push(format!(
                        "batching.allowed_batch_sizes must end with max_batch_size ({}), as in TF Serving",
                        b.max_batch_size
                    ));
                }
            }
            if b.num_batch_threads == Some(0) {
                r.push("batching.num_batch_threads must be at least 1".to_string());
            }
            if let Some(m) = &self.model {
                for t in m.inputs.iter().filter(|t| t.shape.first() != Some(&-1)) {
                    r.push(format!(
                        "batching needs a batch dimension: input '{}' has shape {:?}, whose first size must be -1",
                        t.name, t.shape
                    ));
                }
            }
        }
        // The largest batch the server builds (and warms up with, on zeros) must fit in
        // memory: a declared shape of [-1, 4e12] or a max_batch_size of 1e8 would
        // otherwise take the process down at load.
        if let Some(m) = &self.model {
            let rows = self
                .batching
                .as_ref()
                .map_or(1, |b| b.max_batch_size.max(1)) as i64;
            for t in &m.inputs {
                let mut shape: Vec<i64> = t.shape.iter().map(|&d| d.max(1)).collect();
                if let Some(first) = shape.first_mut() {
                    *first = if t.shape[0] == -1 { rows } else { *first };
                }
                let bytes = crate::tensor::checked_bytes(&shape, t.dtype);
                if bytes.is_none_or(|b| b > MAX_BATCH_INPUT_BYTES) {
                    r.push(format!(
                        "model.inputs '{}': a batch of shape {shape:?} (max_batch_size rows, -1 taken as 1) is over the {} MiB a batch input may take; check the declared shape and max_batch_size",
                        t.name,
                        MAX_BATCH_INPUT_BYTES >> 20
                    ));
                }
            }
        }
        if let Some(h) = &self.handler {
            if h.limits.memory_mib == 0 || h.limits.cpu_ms == 0 {
                r.push("handler.limits: memory_mib and cpu_ms must be positive".to_string());
            }
        }
        for (what, p) in self.paths() {
            if let Err(e) = relative_path(p) {
                r.push(format!("{what} `{p}`: {e}"));
            }
        }
        r
    }

    /// The plugin sections with their world: `("handler", ..)` and `("router", ..)`.
    pub fn plugins(&self) -> Vec<(&'static str, &PluginSpec)> {
        let mut v = Vec::new();
        if let Some(h) = &self.handler {
            v.push(("handler", h));
        }
        if let Some(r) = &self.router {
            v.push(("router", r));
        }
        v
    }

    /// Is this an endpoint bundle (variants behind a router)?
    pub fn is_endpoint(&self) -> bool {
        self.endpoint.is_some()
    }

    fn check_endpoint(&self, r: &mut Vec<String>) {
        let Some(e) = &self.endpoint else {
            r.push("[[variants]] and [router] belong to an endpoint bundle, which needs an [endpoint] section".to_string());
            return;
        };
        for (what, present) in [
            ("[model]", self.model.is_some()),
            ("[batching]", self.batching.is_some()),
            ("[handler]", self.handler.is_some()),
        ] {
            if present {
                r.push(format!(
                    "an endpoint bundle has no {what}: it routes to model bundles named in [[variants]]"
                ));
            }
        }
        if self.router.is_none() {
            r.push(
                "an endpoint bundle needs a [router] section (path to the router plugin)"
                    .to_string(),
            );
        }
        if self.variants.is_empty() {
            r.push("an endpoint bundle needs at least one [[variants]] entry".to_string());
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.variants {
            let name = v.name();
            if let Err(e) = crate::names::check_name("variants: model", &v.model) {
                r.push(e);
            }
            if v.model == self.bundle.name {
                r.push(format!(
                    "variants: the endpoint '{}' cannot route to itself",
                    v.model
                ));
            }
            if let Err(e) = crate::names::check_name("variants: name", name) {
                r.push(e);
            }
            if !names.insert(name) {
                r.push(format!(
                    "variants: the name '{name}' appears twice; give variants of one model a `name` each"
                ));
            }
            if v.version.is_some() && v.label.is_some() {
                r.push(format!(
                    "variants '{name}': give a version or a label, not both"
                ));
            }
            if let Some(Err(e)) = v.version.map(crate::names::check_version) {
                r.push(format!("variants '{name}': {e}"));
            }
        }
        if let Some(d) = &e.default_variant {
            if !self.variants.iter().any(|v| v.name() == d) {
                r.push(format!(
                    "endpoint.default_variant '{d}' is not the name of a variant ({})",
                    self.variants
                        .iter()
                        .map(|v| v.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if let Some(h) = &e.routing_key_header {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                r.push(format!(
                    "endpoint.routing_key_header {h:?} is not a header name"
                ));
            }
        }
        if e.stats_window_ms == 0 {
            r.push("endpoint.stats_window_ms must be positive".to_string());
        }
        if let Some(rt) = &self.router {
            if rt.limits.memory_mib == 0 || rt.limits.cpu_ms == 0 {
                r.push("router.limits: memory_mib and cpu_ms must be positive".to_string());
            }
        }
    }

    fn paths(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        if let Some(rt) = &self.router {
            v.push(("router.path", rt.path.as_str()));
        }
        if let Some(m) = &self.model {
            v.push(("model.path", m.path.as_str()));
        }
        if let Some(h) = &self.handler {
            v.push(("handler.path", h.path.as_str()));
        }
        v
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    const MLP: &str = r#"
[bundle]
name = "mlp"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
device = "cpu"
inputs = [{ name = "input", dtype = "fp32", shape = [-1, 4] }]
outputs = [{ name = "output", dtype = "fp32", shape = [-1, 3] }]
"#;

    #[test]
    fn parses_a_model_manifest() {
        let m = parse_manifest(MLP).unwrap();
        assert_eq!(m.bundle.name, "mlp");
        let model = m.model.as_ref().unwrap();
        assert_eq!(model.inputs[0].dtype, DType::Fp32);
        assert_eq!(model.inputs[0].shape, vec![-1, 4]);
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    #[test]
    fn a_manifest_error_is_one_line_naming_the_line() {
        let err =
            parse_manifest("[bundle]\nname = \"x\"\nversion = 1\nflavour = \"odd\"\n").unwrap_err();
        assert!(
            err.starts_with("bundle.toml line 4: unknown field `flavour`"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = parse_manifest(&MLP.replace("device = \"cpu\"", "devise = \"cpu\"")).unwrap_err();
        assert!(err.contains("devise"), "{err}");
    }

    #[test]
    fn handler_config_accepts_scalars() {
        let text = format!(
            "{MLP}\n[handler]\npath = \"plugins/handler.wasm\"\nconfig = {{ top_k = 5, labels = \"assets/l.txt\", on = true }}\n"
        );
        let m = parse_manifest(&text).unwrap();
        let h = m.handler.unwrap();
        assert_eq!(h.config["top_k"], "5");
        assert_eq!(h.config["on"], "true");
        assert_eq!(h.limits.memory_mib, 64);
        assert_eq!(h.limits.cpu_ms, 100);
    }

    #[test]
    fn every_reason_is_reported() {
        let text = MLP
            .replace("name = \"mlp\"", "name = \"Bad Name\"")
            .replace("version = 1", "version = 0")
            .replace("device = \"cpu\"", "device = \"tpu\"")
            .replace("model/model.pt", "../escape.pt");
        let reasons = parse_manifest(&text).unwrap().check();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].contains("bundle.name"));
        assert!(reasons.iter().any(|r| r.contains("`..` is not allowed")));
        assert!(reasons.iter().any(|r| r.contains("model.device")));
    }

    #[test]
    fn batching_is_checked() {
        let ok = format!("{MLP}\n[batching]\nmax_batch_size = 8\nallowed_batch_sizes = [2, 8]\n");
        let m = parse_manifest(&ok).unwrap();
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!(m.batching.as_ref().unwrap().max_enqueued_batches, 64);
        let bad = format!("{MLP}\n[batching]\nmax_batch_size = 8\nallowed_batch_sizes = [4, 2]\n")
            .replace("shape = [-1, 4]", "shape = [1, 4]");
        let reasons = parse_manifest(&bad).unwrap().check();
        assert!(
            reasons.iter().any(|r| r.contains("must be increasing")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("end with max_batch_size")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("first size must be -1")),
            "{reasons:?}"
        );
    }

    const AB: &str = r#"
[bundle]
name = "ab"
version = 1

[endpoint]
routing_key_header = "x-user-id"
default_variant = "b"

[[variants]]
model = "a"
weight = 90

[[variants]]
model = "b"
weight = 10

[router]
path = "plugins/router.wasm"
config = { shadow = "b" }
"#;

    #[test]
    fn a_batch_input_must_fit_in_memory() {
        let manifest = |shape: &str, batching: &str| {
            parse_manifest(&format!(
                "[bundle]\nname = \"m\"\nversion = 1\n[model]\nbackend = \"torchscript\"\npath = \"model/model.pt\"\n\
                 inputs = [{{ name = \"x\", dtype = \"fp32\", shape = {shape} }}]\n{batching}"
            ))
            .unwrap()
            .check()
        };
        assert_eq!(manifest("[-1, 4]", ""), Vec::<String>::new());
        let huge = manifest("[-1, 4000000000000]", "");
        assert!(
            huge.len() == 1 && huge[0].contains("over the 1024 MiB a batch input may take"),
            "{huge:?}"
        );
        let rows = manifest("[-1, 4]", "[batching]\nmax_batch_size = 100000000\n");
        assert!(
            rows.iter().any(|r| r.contains("[100000000, 4]")),
            "{rows:?}"
        );
        assert_eq!(
            manifest("[-1, 3, 224, 224]", "[batching]\nmax_batch_size = 64\n"),
            Vec::<String>::new()
        );
        let overflow = manifest("[-1, 4611686018427387904, 4]", "");
        assert_eq!(overflow.len(), 1, "{overflow:?}");
    }

    #[test]
    fn parses_an_endpoint_manifest() {
        let m = parse_manifest(AB).unwrap();
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert!(m.is_endpoint());
        let e = m.endpoint.as_ref().unwrap();
        assert_eq!(e.on_router_error, RouterErrorPolicy::FailOpen);
        assert_eq!(e.stats_window_ms, 10_000);
        assert_eq!(m.variants[1].name(), "b");
        assert_eq!(m.variants[0].weight, 90);
        assert_eq!(m.router.as_ref().unwrap().config["shadow"], "b");
        let closed = AB.replace(
            "default_variant = \"b\"",
            "on_router_error = \"fail-closed\"",
        );
        let m = parse_manifest(&closed).unwrap();
        assert_eq!(
            m.endpoint.unwrap().on_router_error,
            RouterErrorPolicy::FailClosed
        );
        assert!(parse_manifest(&AB.replace("fail-open", "")).is_ok());
        assert!(parse_manifest(&closed.replace("fail-closed", "fail-sometimes")).is_err());
    }

    #[test]
    fn endpoint_manifests_are_checked() {
        // A model bundle's sections do not belong in an endpoint, and the reverse.
        let mixed = format!("{AB}\n[model]\nbackend = \"torchscript\"\npath = \"m.pt\"\n");
        let reasons = parse_manifest(&mixed).unwrap().check();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("an endpoint bundle has no [model]")),
            "{reasons:?}"
        );
        let text = AB
            .replace("default_variant = \"b\"", "default_variant = \"c\"")
            .replace(
                "model = \"b\"",
                "model = \"a\"\nlabel = \"canary\"\nversion = 2",
            )
            .replace("model = \"a\"\nweight = 90", "model = \"ab\"\nweight = 90");
        let reasons = parse_manifest(&text).unwrap().check();
        for want in [
            "cannot route to itself",
            "give a version or a label, not both",
            "default_variant 'c' is not the name of a variant",
        ] {
            assert!(
                reasons.iter().any(|r| r.contains(want)),
                "{want}: {reasons:?}"
            );
        }
        let twice = AB
            .replace("model = \"b\"", "model = \"a\"")
            .replace("default_variant = \"b\"", "");
        let reasons = parse_manifest(&twice).unwrap().check();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("the name 'a' appears twice")),
            "{reasons:?}"
        );
        let no_router = AB.replace(
            "[router]\npath = \"plugins/router.wasm\"\nconfig = { shadow = \"b\" }\n",
            "",
        );
        let reasons = parse_manifest(&no_router).unwrap().check();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("needs a [router] section")),
            "{reasons:?}"
        );
        let neither = "[bundle]\nname = \"x\"\nversion = 1\n";
        let reasons = parse_manifest(neither).unwrap().check();
        assert!(
            reasons[0].contains("a [model] section is required"),
            "{reasons:?}"
        );
    }

    #[test]
    fn names_and_devices() {
        assert!(valid_name("resnet18"));
        assert!(valid_name("a.b-c_d"));
        assert!(!valid_name("-a"));
        assert!(valid_name("ResNet50"));
        assert!(!valid_name(".."));
        assert!(!valid_name(""));
        assert_eq!(DeviceSpec::parse("cuda:1"), Ok(DeviceSpec::Cuda(1)));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert!(DeviceSpec::parse("gpu").is_err());
    }

    #[test]
    fn paths_stay_inside() {
        assert!(relative_path("/etc/passwd").is_err());
        assert!(relative_path("a/../../b").is_err());
        assert!(relative_path("model/model.pt").is_ok());
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        assert!(resolve_inside(dir.path(), "link")
            .unwrap_err()
            .contains("outside"));
    }
}
