//! The manifest's schema: the types `bundle.toml` parses into (unknown fields are errors
//! that name them), their defaults, and [`parse_manifest`], whose error names the line.
//!
//! Parsing only: the rules a parsed manifest must follow are `checks`'.

use crate::tensor::DType;
use serde::Deserialize;
use std::collections::BTreeMap;

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
    /// No model: a handler bundle without `[model]` (pure pre- or post-processing).
    /// Never written in a manifest; the spec of such a bundle says it.
    #[serde(skip_deserializing)]
    None,
}

impl ModelSpec {
    /// The spec of a model-less handler bundle: no model, no tensors.
    pub fn none() -> ModelSpec {
        ModelSpec {
            backend: BackendKind::None,
            path: String::new(),
            device: "cpu".to_string(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            tags: None,
            signature: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub backend: BackendKind,
    /// Relative to the bundle root, e.g. `model/model.pt`; for `tensorflow` the SavedModel
    /// directory, `model/saved_model` when left out.
    #[serde(default)]
    pub path: String,
    #[serde(default = "default_device")]
    pub device: String,
    /// The model's inputs; for `tensorflow` they may be left out and are then read from
    /// the signature (and checked against it when given).
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
    /// `tensorflow`: the SavedModel's tag set (default `["serve"]`).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// `tensorflow`: the signature served (default `serving_default`).
    #[serde(default)]
    pub signature: Option<String>,
}

impl ModelSpec {
    /// The SavedModel's tags.
    pub fn tags(&self) -> Vec<String> {
        self.tags
            .clone()
            .unwrap_or_else(|| vec!["serve".to_string()])
    }

    /// The signature served.
    pub fn signature(&self) -> &str {
        self.signature.as_deref().unwrap_or("serving_default")
    }
}

/// Where a TensorFlow bundle's SavedModel is when `model.path` is left out.
pub const DEFAULT_SAVED_MODEL: &str = "model/saved_model";

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
    /// TF Serving's `pad_variable_length_inputs`: requests whose inputs differ only in
    /// dimensions declared `-1` past the batch (a sentence's tokens) share a batch, each
    /// padded to the longest with its input's `pad_values` entry (default 0); outputs'
    /// `-1` dimensions are cut back to each request's own size.
    #[serde(default)]
    pub pad_variable_length_inputs: bool,
    /// The value each input is padded with, by input name (default 0).
    #[serde(default)]
    pub pad_values: BTreeMap<String, f64>,
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
    /// Values handed to the plugin: any TOML value (strings, numbers, booleans, lists,
    /// tables). `host.config` gives each as a string (a string as it is, anything else
    /// as JSON); `host.config-json` gives the whole table as one JSON object, which the
    /// SDK's `config::<T>()` deserializes.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub limits: PluginLimits,
    /// Other served models this handler may load by name through wasi-nn, besides its
    /// own: `"NAME"` (its highest available version), `"NAME@3"` (version 3) or
    /// `"NAME@stable"` (the version a label names). Each is resolved on every
    /// `load-by-name`, so the handler follows the dependency's hot swaps. Only
    /// `[handler]` may declare them.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Run the plugin's `init` export once at load and start every request from the
    /// instance it left (a Wizer snapshot): one-time setup such as parsing a tokenizer.
    /// Only `[handler]`; off by default, since the snapshot costs a second compile at
    /// load (0.7 s for the digits plugin), which a plugin without setup should not pay.
    #[serde(default)]
    pub init: bool,
}

/// A model a handler declares it calls besides its own (`[handler] dependencies`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// The model's name, which is also the name the plugin loads it by.
    pub model: String,
    pub pin: Pin,
}

/// Which version of a dependency a plugin gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// The highest available version, as a request without a version gets.
    Latest,
    Version(u64),
    Label(String),
}

impl Dependency {
    /// Parses `NAME`, `NAME@VERSION` or `NAME@LABEL`; the error says which part is wrong.
    pub fn parse(text: &str) -> Result<Dependency, String> {
        let (model, pin) = match text.split_once('@') {
            None => (text, Pin::Latest),
            Some((model, pin)) if !pin.is_empty() && pin.bytes().all(|b| b.is_ascii_digit()) => {
                (model, Pin::Version(crate::names::parse_version(pin)?))
            }
            Some((model, label)) => {
                crate::names::check_name("label", label)?;
                (model, Pin::Label(label.to_string()))
            }
        };
        crate::names::check_name("model name", model)?;
        Ok(Dependency {
            model: model.to_string(),
            pin,
        })
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pin {
            Pin::Latest => write!(f, "{}", self.model),
            Pin::Version(v) => write!(f, "{}@{v}", self.model),
            Pin::Label(l) => write!(f, "{}@{l}", self.model),
        }
    }
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

impl PluginSpec {
    /// The declared dependencies, parsed (the manifest's checks have refused bad ones).
    pub fn dependencies(&self) -> Vec<Dependency> {
        self.dependencies
            .iter()
            .filter_map(|d| Dependency::parse(d).ok())
            .collect()
    }

    /// The config as `host.config` answers it: a string as it is, any other value as
    /// JSON (`3`, `true`, `[1,2]`, `{"a":1}`).
    pub fn config_strings(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    toml::Value::String(s) => s.clone(),
                    other => toml_to_json(other).to_string(),
                };
                (k.clone(), s)
            })
            .collect()
    }

    /// The whole config table as a JSON object (`host.config-json`).
    pub fn config_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_json(v)))
            .collect();
        serde_json::Value::Object(map).to_string()
    }
}

/// A TOML value as JSON; a date or time becomes its RFC 3339 text.
fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
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

/// Parses a manifest; the error names the field and line, as the TOML parser reports.
/// The most bytes one input of one batch may take, checked at validation (the largest
/// batch, `max_batch_size` rows, is also what a version warms up with). 1 GiB holds, for
/// example, 1,365 RGB images of 224x224 or 341 of 512x512 in fp32.
pub const MAX_BATCH_INPUT_BYTES: usize = 1 << 30;

pub fn parse_manifest(text: &str) -> Result<Manifest, String> {
    let mut manifest: Manifest = toml::from_str(text).map_err(|e| {
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
    })?;
    if let Some(m) = manifest.model.as_mut() {
        if m.path.is_empty() && m.backend == BackendKind::Tensorflow {
            m.path = DEFAULT_SAVED_MODEL.to_string();
        }
    }
    Ok(manifest)
}
