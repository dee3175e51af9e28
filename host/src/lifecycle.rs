//! The model's life: loading the versions that the repository holds, the registry of
//! loaded versions that `api` reads, and each version's state (TF Serving's START,
//! LOADING, AVAILABLE, UNLOADING, END, with an error).
//!
//! For now every version found at start-up is loaded once; version policies, labels,
//! uploads and hot swap come next and will live here. A request holds an
//! `Arc<Servable>` for its whole life, so a later unload can never pull a model from
//! under a request in flight.

use crate::bundle::Bundle;
use crate::metrics::{Metrics, VersionMetrics};
use crate::nn::Runner;
use crate::plugin::{Plugin, PluginRuntime};
use crate::repository;
use crate::tensor::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// TF Serving's version states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Start,
    Loading,
    Available,
    Unloading,
    End,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Start => "START",
            State::Loading => "LOADING",
            State::Available => "AVAILABLE",
            State::Unloading => "UNLOADING",
            State::End => "END",
        }
    }
}

/// TF Serving's version policies: which stored versions should be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The newest N versions that load (a newer one that fails leaves an older serving).
    Latest(usize),
    /// Every stored version.
    All,
    /// Exactly these versions.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// From the config file: `"all"`, `{ latest = N }` or `{ specific = [..] }`.
    /// The policy as the config writes it: `latest = 1`, `all`, `specific = [3, 5]`.
    pub fn describe(&self) -> String {
        match self {
            VersionPolicy::Latest(n) => format!("latest = {n}"),
            VersionPolicy::All => "all".into(),
            VersionPolicy::Specific(v) => format!("specific = {v:?}"),
        }
    }

    pub fn from_toml(v: &toml::Value) -> Result<VersionPolicy, String> {
        let bad = || {
            format!(
                "a version policy is \"all\", {{ latest = N }} or {{ specific = [1, 2] }}, not {v}"
            )
        };
        match v {
            toml::Value::String(s) if s == "all" => Ok(VersionPolicy::All),
            toml::Value::Table(t) if t.len() == 1 => match (t.get("latest"), t.get("specific")) {
                (Some(toml::Value::Integer(n)), None) if *n > 0 => {
                    Ok(VersionPolicy::Latest(*n as usize))
                }
                (None, Some(toml::Value::Array(a))) => a
                    .iter()
                    .map(|x| {
                        x.as_integer()
                            .filter(|&n| n > 0)
                            .map(|n| n as u64)
                            .ok_or_else(bad)
                    })
                    .collect::<Result<_, _>>()
                    .map(VersionPolicy::Specific),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }

    /// Whether `version` is wanted, given every stored version (any order). For
    /// `Latest`, "the newest N stored"; loading falls back to older ones on failure.
    pub fn wants(&self, version: u64, stored: &[u64]) -> bool {
        match self {
            VersionPolicy::All => true,
            VersionPolicy::Specific(list) => list.contains(&version),
            VersionPolicy::Latest(n) => stored.iter().filter(|&&v| v > version).count() < *n,
        }
    }
}

/// The policy of each model: a default and per-model choices.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub default: VersionPolicy,
    pub per_model: BTreeMap<String, VersionPolicy>,
}

impl Policies {
    pub fn get(&self, model: &str) -> &VersionPolicy {
        self.per_model.get(model).unwrap_or(&self.default)
    }
}

/// Memory budgets per device (`cpu`, `cuda:0`, ...), from the config. A version reserves
/// its model's size (the model file's bytes: the weights) before it loads; the
/// reservation is released when the version's last handle is dropped.
#[derive(Debug, Default)]
pub struct DeviceBudget {
    limits: BTreeMap<String, u64>,
    used: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// A version's share of a device budget; released on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<DeviceBudget>,
    device: String,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap();
        if let Some(u) = used.get_mut(&self.device) {
            *u = u.saturating_sub(self.bytes);
        }
    }
}

/// A load refused by a device's memory budget: the bundle is fine, the server has no
/// room for it now (an upload answers 409 with this, not 400).
#[derive(Debug)]
pub struct BudgetExceeded(pub String);

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BudgetExceeded {}

impl DeviceBudget {
    /// Budgets in MiB per device name.
    pub fn new(limits_mib: &BTreeMap<String, u64>) -> DeviceBudget {
        DeviceBudget {
            limits: limits_mib
                .iter()
                .map(|(d, m)| (d.clone(), m.saturating_mul(1 << 20)))
                .collect(),
            used: Default::default(),
        }
    }

    /// Reserves `bytes` on `device`, or says why not and what to do.
    pub fn reserve(
        self: &Arc<Self>,
        what: &str,
        device: &str,
        bytes: u64,
    ) -> anyhow::Result<Reservation> {
        let mut used = self.used.lock().unwrap();
        let now = used.get(device).copied().unwrap_or(0);
        if let Some(&limit) = self.limits.get(device) {
            let mib = |b: u64| b.div_ceil(1 << 20);
            if bytes > limit {
                return Err(BudgetExceeded(format!(
                    "{what} needs about {} MiB on {device}, more than its whole budget of {} MiB \
                     (device_memory_mib in the server config): raise that budget to at least {} MiB",
                    mib(bytes),
                    limit >> 20,
                    mib(bytes)
                ))
                .into());
            }
            if now + bytes > limit {
                return Err(BudgetExceeded(format!(
                    "{what} needs about {} MiB on {device}, but {} of its {} MiB budget are in use \
                     (device_memory_mib in the server config): unload a version or raise the budget \
                     (replacing a version needs room for both while requests move over)",
                    mib(bytes),
                    mib(now),
                    limit >> 20
                ))
                .into());
            }
        }
        used.insert(device.to_string(), now + bytes);
        Ok(Reservation {
            budget: self.clone(),
            device: device.to_string(),
            bytes,
        })
    }

    /// Bytes reserved per device now.
    pub fn used(&self) -> BTreeMap<String, u64> {
        self.used.lock().unwrap().clone()
    }
}

/// A loaded, servable model version.
pub struct Servable {
    pub bundle: Bundle,
    /// The model's execution path; `None` for an endpoint.
    pub runner: Option<Arc<Runner>>,
    pub handler: Option<Plugin>,
    /// Set for an endpoint bundle (variants behind a router), which has no model.
    pub endpoint: Option<crate::routing::Endpoint>,
    /// Its share of the device's memory budget, released with the last handle.
    pub reservation: Option<Reservation>,
    /// `{model}@{version}`, made once: every answer names the version that served it.
    pub id: bytes::Bytes,
}

fn id_of(bundle: &Bundle) -> bytes::Bytes {
    bytes::Bytes::from(format!("{}@{}", bundle.name(), bundle.version()))
}

impl Servable {
    pub fn name(&self) -> &str {
        self.bundle.name()
    }
    pub fn version(&self) -> u64 {
        self.bundle.version()
    }
    /// The model's signature. Only for model servables: `api` resolves an endpoint to
    /// one of its variants' models before it gets here.
    pub fn model_spec(&self) -> &crate::bundle::ModelSpec {
        self.bundle
            .manifest
            .model
            .as_ref()
            .expect("api resolves endpoints to models first")
    }

    /// The execution path (model servables only, as for [`Servable::model_spec`]).
    pub fn runner(&self) -> &Arc<Runner> {
        self.runner
            .as_ref()
            .expect("api resolves endpoints to models first")
    }
}

/// What the server reports about one version.
#[derive(Debug, Clone)]
pub struct VersionStatus {
    pub version: u64,
    pub state: State,
    /// The full error (a failed load's libtorch error with its stack frames, paths):
    /// for the log and authenticated answers; others get [`VersionStatus::public_error`].
    pub error: Option<String>,
}

impl VersionStatus {
    /// The error as an unauthenticated caller may see it (`names::public_reason`).
    pub fn public_error(&self) -> Option<String> {
        self.error.as_deref().map(crate::names::public_reason)
    }
}

#[derive(Default)]
struct ModelEntry {
    available: BTreeMap<u64, Arc<Servable>>,
    status: BTreeMap<u64, VersionStatus>,
    /// Label to version; a labelled version stays loaded whatever the policy.
    labels: BTreeMap<String, u64>,
}

/// Why a name and version did not resolve to a servable.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolveError {
    UnknownModel(String),
    UnknownVersion(String, u64),
    UnknownLabel(String, String),
    /// Known but not AVAILABLE: the state and its error, if any.
    NotAvailable(String, u64, String),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::UnknownModel(m) => write!(
                f,
                "model '{m}' is not found (GET /v1/models/{{name}} shows a model's versions)"
            ),
            ResolveError::UnknownVersion(m, v) => {
                write!(f, "version {v} of model '{m}' is not found")
            }
            ResolveError::UnknownLabel(m, l) => write!(
                f,
                "label '{l}' is not assigned for model '{m}' (PUT /v1/models/{m}/labels/{l} assigns it)"
            ),
            ResolveError::NotAvailable(m, v, why) => {
                write!(f, "version {v} of model '{m}' is not available: {why}")
            }
        }
    }
}

/// The loaded versions of every model, shared by all requests.
pub struct Registry {
    models: RwLock<HashMap<String, ModelEntry>>,
    metrics: Arc<Metrics>,
    /// Device memory budgets that loads reserve from.
    pub budget: Arc<DeviceBudget>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>, budget: DeviceBudget) -> Registry {
        Registry {
            models: RwLock::new(HashMap::new()),
            metrics,
            budget: Arc::new(budget),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The servable for `name` at `version`, or the highest available version.
    pub fn resolve(&self, name: &str, version: Option<u64>) -> Result<Arc<Servable>, ResolveError> {
        let models = self.models.read().unwrap();
        let entry = models
            .get(name)
            .ok_or_else(|| ResolveError::UnknownModel(name.to_string()))?;
        match version {
            None => entry
                .available
                .values()
                .next_back()
                .cloned()
                .ok_or_else(|| {
                    let why = entry
                        .status
                        .values()
                        .next_back()
                        .and_then(VersionStatus::public_error)
                        .unwrap_or_else(|| "no version is AVAILABLE".into());
                    let v = entry.status.keys().next_back().copied().unwrap_or(0);
                    ResolveError::NotAvailable(name.to_string(), v, why)
                }),
            Some(v) => entry
                .available
                .get(&v)
                .cloned()
                .ok_or_else(|| match entry.status.get(&v) {
                    None => ResolveError::UnknownVersion(name.to_string(), v),
                    Some(s) => ResolveError::NotAvailable(
                        name.to_string(),
                        v,
                        s.public_error()
                            .unwrap_or_else(|| format!("it is {}", s.state.as_str())),
                    ),
                }),
        }
    }

    /// The version a label points to.
    pub fn label(&self, model: &str, label: &str) -> Result<u64, ResolveError> {
        let models = self.models.read().unwrap();
        let entry = models
            .get(model)
            .ok_or_else(|| ResolveError::UnknownModel(model.to_string()))?;
        entry
            .labels
            .get(label)
            .copied()
            .ok_or_else(|| ResolveError::UnknownLabel(model.to_string(), label.to_string()))
    }

    /// The versions of a model serving now, lowest first.
    pub fn available_versions(&self, model: &str) -> Vec<u64> {
        let models = self.models.read().unwrap();
        models
            .get(model)
            .map(|e| e.available.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every label of a model.
    pub fn labels(&self, model: &str) -> BTreeMap<String, u64> {
        let models = self.models.read().unwrap();
        models
            .get(model)
            .map(|e| e.labels.clone())
            .unwrap_or_default()
    }

    /// Points `label` at `version`. Unless `force`, the version must be AVAILABLE
    /// (TF Serving's rule).
    pub fn set_label(
        &self,
        model: &str,
        label: &str,
        version: u64,
        force: bool,
    ) -> Result<(), String> {
        let mut models = self.models.write().unwrap();
        let entry = models
            .get_mut(model)
            .ok_or_else(|| format!("model '{model}' is not found"))?;
        if !force && !entry.available.contains_key(&version) {
            return Err(format!(
                "version {version} of '{model}' is not AVAILABLE; a label goes to an available version (add \"force\": true to assign it anyway)"
            ));
        }
        entry.labels.insert(label.to_string(), version);
        Ok(())
    }

    /// Restores labels read from the repository at start-up.
    pub(crate) fn restore_labels(&self, model: &str, labels: BTreeMap<String, u64>) {
        let mut models = self.models.write().unwrap();
        models.entry(model.to_string()).or_default().labels = labels;
    }

    /// Every model with its versions' statuses (highest first) and labels.
    pub fn list(&self) -> Vec<(String, Vec<VersionStatus>, BTreeMap<String, u64>)> {
        let models = self.models.read().unwrap();
        let mut out: Vec<_> = models
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    e.status.values().rev().cloned().collect(),
                    e.labels.clone(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every version's status, highest first, or `None` for an unknown model.
    pub fn status(&self, name: &str) -> Option<Vec<VersionStatus>> {
        let models = self.models.read().unwrap();
        models
            .get(name)
            .map(|e| e.status.values().rev().cloned().collect())
    }

    /// The names of all models, sorted.
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.models.read().unwrap().keys().cloned().collect();
        names.sort();
        names
    }

    fn set_status(&self, model: &str, version: u64, state: State, error: Option<String>) {
        let mut models = self.models.write().unwrap();
        let entry = models.entry(model.to_string()).or_default();
        self.record_state(entry, model, version, state, error);
    }

    /// Moves a version to `state` in its model's entry (held locked) and in the metrics.
    fn record_state(
        &self,
        entry: &mut ModelEntry,
        model: &str,
        version: u64,
        state: State,
        error: Option<String>,
    ) {
        let old = entry.status.get(&version).map(|s| s.state.as_str());
        self.metrics
            .version_state(model, version, old, state.as_str());
        entry.status.insert(
            version,
            VersionStatus {
                version,
                state,
                error,
            },
        );
    }

    /// Publishes a version that just loaded, unless its state moved on while it loaded:
    /// an unload or delete meanwhile (END) means it must not serve, and a concurrent load
    /// of the same version that published first (AVAILABLE) keeps serving; this copy is
    /// then dropped (releasing its memory reservation) and the one serving is returned.
    fn publish_loaded(&self, servable: Arc<Servable>) -> Result<Arc<Servable>, String> {
        let (model, v) = (servable.name().to_string(), servable.version());
        let mut models = self.models.write().unwrap();
        let entry = models.entry(model.clone()).or_default();
        if entry.status.get(&v).map(|s| s.state) != Some(State::Loading) {
            return match entry.available.get(&v) {
                Some(serving) => Ok(serving.clone()),
                None => Err(format!(
                    "version {v} of '{model}' was unloaded or deleted while it loaded; it does not serve"
                )),
            };
        }
        self.publish_in(entry, servable.clone());
        Ok(servable)
    }

    /// Records a failed load, unless a concurrent load of the same version has published
    /// it meanwhile (a failed duplicate must not mark a serving version END).
    fn record_load_failure(&self, model: &str, version: u64, msg: String) {
        let mut models = self.models.write().unwrap();
        let entry = models.entry(model.to_string()).or_default();
        if !entry.available.contains_key(&version) {
            self.record_state(entry, model, version, State::End, Some(msg));
        }
    }

    /// A retired version's last request finished: END, and its per-version metric series
    /// are removed, unless it was loaded again meanwhile (LOADING or AVAILABLE: the new
    /// copy owns the status and shares the series).
    fn retired(&self, model: &str, version: u64) -> bool {
        let mut models = self.models.write().unwrap();
        let Some(entry) = models.get_mut(model) else {
            return false;
        };
        let unloading = entry
            .status
            .get(&version)
            .is_some_and(|s| s.state == State::Unloading);
        if !unloading || entry.available.contains_key(&version) {
            return false;
        }
        self.record_state(entry, model, version, State::End, None);
        self.metrics.forget_version(model, version);
        true
    }

    pub(crate) fn publish(&self, servable: Arc<Servable>) {
        let mut models = self.models.write().unwrap();
        let entry = models.entry(servable.name().to_string()).or_default();
        self.publish_in(entry, servable);
    }

    /// AVAILABLE in its model's entry (held locked): requests resolve to it from now.
    fn publish_in(&self, entry: &mut ModelEntry, servable: Arc<Servable>) {
        let v = servable.version();
        self.record_state(entry, servable.name(), v, State::Available, None);
        entry.available.insert(v, servable);
    }
}

impl Registry {
    /// Versions of `model` beyond the newest `keep` stop taking new requests (UNLOADING)
    /// and reach END once the last request holding them finishes.
    pub fn retire_unwanted(self: &Arc<Self>, model: &str, policy: &VersionPolicy) {
        let retired: Vec<Arc<Servable>> = {
            let mut models = self.models.write().unwrap();
            let Some(entry) = models.get_mut(model) else {
                return;
            };
            let labelled: Vec<u64> = entry.labels.values().copied().collect();
            let loaded: Vec<u64> = entry.available.keys().copied().collect();
            let keep: Vec<u64> = match policy {
                // Among what is loaded, the newest N serve.
                VersionPolicy::Latest(n) => loaded.iter().rev().take(*n).copied().collect(),
                other => loaded
                    .iter()
                    .copied()
                    .filter(|&v| other.wants(v, &loaded))
                    .collect(),
            };
            let versions: Vec<u64> = loaded
                .iter()
                .filter(|v| !keep.contains(v) && !labelled.contains(v))
                .copied()
                .collect();
            versions
                .iter()
                .filter_map(|v| entry.available.remove(v))
                .collect()
        };
        self.retire(retired);
    }

    /// Takes one version out of service (for a delete).
    pub fn retire_version(self: &Arc<Self>, model: &str, version: u64) {
        let removed = {
            let mut models = self.models.write().unwrap();
            models
                .get_mut(model)
                .and_then(|e| e.available.remove(&version))
        };
        match removed {
            Some(s) => self.retire(vec![s]),
            None => self.set_status(model, version, State::End, None),
        }
    }

    fn retire(self: &Arc<Self>, retired: Vec<Arc<Servable>>) {
        for servable in retired {
            let (name, version) = (servable.name().to_string(), servable.version());
            self.set_status(&name, version, State::Unloading, None);
            let registry = self.clone();
            tokio::spawn(async move {
                // Requests in flight hold their own Arc; wait for the last one.
                while Arc::strong_count(&servable) > 1 {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                drop(servable);
                if registry.retired(&name, version) {
                    tracing::info!(model = %name, version, "version retired (END)");
                }
            });
        }
    }
}

/// Runs background work (loading a model, checking an upload) on a thread of its own
/// at a lower CPU priority (nice 10), so that serving the loaded models keeps the cores
/// it needs; awaits its result without blocking the runtime. Not the blocking pool: its
/// threads can become runtime workers (`block_in_place`), which must not be niced.
pub async fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nnserve-loader".into())
        .spawn(move || {
            // SAFETY: setpriority on this thread's own id has no memory effects.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
            }
            let _ = tx.send(f());
            crate::alloc::release_thread_memory();
        })?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the loader thread panicked"))
}

/// Replays a version's warm-up requests (`warmup/*.json`) through the real request
/// path before it is published. Set by the server, which owns the request path.
pub type WarmupHook = Arc<
    dyn Fn(Arc<Servable>) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync,
>;

/// Loads one version off the async runtime, warms it up and publishes it; records the
/// error otherwise. Returns the servable or the error message.
pub async fn load_and_publish(
    registry: &Registry,
    runtime: &Arc<PluginRuntime>,
    entry: repository::Entry,
    warmup: Option<&WarmupHook>,
) -> Result<Arc<Servable>, String> {
    let (model, version) = (entry.model.clone(), entry.version);
    registry.set_status(&model, version, State::Loading, None);
    let started = Instant::now();
    let rt = runtime.clone();
    let all_metrics = registry.metrics.clone();
    let budget = registry.budget.clone();
    let loaded = in_background(move || {
        let metrics = || all_metrics.version(&entry.model, entry.version);
        let servable = load_version(&entry, &rt, metrics, Some(&budget))?;
        // A version copied in by hand gets the record an upload writes.
        if let Some(root) = entry.dir.parent().and_then(|p| p.parent()) {
            repository::ensure_meta(root, &entry.model, entry.version, &entry.dir);
        }
        Ok(servable)
    })
    .await
    .and_then(|r| r)
    .map(Arc::new)
    .map_err(|e| format!("{e:#}"));
    let result = match (loaded, warmup) {
        (Ok(s), Some(hook)) => hook(s.clone()).await.map(|_| s),
        (other, _) => other,
    };
    match result {
        Ok(servable) => {
            tracing::info!(
                model = %model, version,
                device = %servable.runner.as_ref().map_or("-".into(), |r| r.device()),
                forwards_at_once = servable.runner.as_ref().map_or(0, |r| r.threading().concurrency),
                threads = %servable.runner.as_ref().map_or("-".into(), |r| r.threading().intra_op.to_json().to_string()),
                router = servable.endpoint.as_ref().map(|e| e.router.name()).unwrap_or("-"),
                plugin = servable.handler.as_ref().map(|p| p.name()).unwrap_or("-"),
                took = ?started.elapsed(), "version AVAILABLE"
            );
            registry.publish_loaded(servable).inspect_err(|msg| {
                tracing::warn!(model = %model, version, "{msg}");
            })
        }
        Err(msg) => {
            tracing::warn!(model = %model, version, "version failed to load: {msg}");
            registry.record_load_failure(&model, version, msg.clone());
            Err(msg)
        }
    }
}

/// Records a version that failed to load or warm up (an upload that was refused).
pub fn record_failure(registry: &Registry, model: &str, version: u64, msg: &str) {
    tracing::warn!(model, version, "upload refused: {msg}");
    registry.set_status(model, version, State::End, Some(msg.to_string()));
}

/// What a repository load did, for the start-up summary.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub failed: Vec<String>,
}

/// Loads every version in the repository. A version that fails is recorded with its
/// error (visible in the status API) and does not stop the others.
pub async fn load_repository(
    root: &Path,
    runtime: Arc<PluginRuntime>,
    registry: &Registry,
    policies: &Policies,
    warmup: Option<&WarmupHook>,
) -> anyhow::Result<LoadReport> {
    let (entries, problems) = repository::scan(root)?;
    let mut report = LoadReport::default();
    for p in problems {
        tracing::warn!(path = %p.path.display(), "skipped: {}", p.reason);
        report
            .failed
            .push(format!("{}: {}", p.path.display(), p.reason));
    }
    // Per model, the versions its policy wants; for `latest = N` the newest N that load,
    // down from the highest: a newer version that fails is reported and an older one serves.
    let mut by_model: BTreeMap<String, Vec<repository::Entry>> = BTreeMap::new();
    for e in entries {
        by_model.entry(e.model.clone()).or_default().push(e);
    }
    for (model, versions) in by_model {
        let labels = repository::read_labels(root, &model);
        let labelled: Vec<u64> = labels.values().copied().collect();
        registry.restore_labels(&model, labels);
        let outcome = load_wanted(
            registry,
            &runtime,
            versions,
            policies.get(&model),
            &labelled,
            warmup,
        )
        .await;
        report.loaded.extend(outcome.loaded);
        report.failed.extend(outcome.failed);
    }
    Ok(report)
}

/// Loads the versions of one model that its policy wants (and the labelled ones), newest
/// first; for `latest = N`, the newest N that load. Versions already AVAILABLE count and
/// are left as they are.
pub async fn load_wanted(
    registry: &Registry,
    runtime: &Arc<PluginRuntime>,
    mut versions: Vec<repository::Entry>,
    policy: &VersionPolicy,
    labelled: &[u64],
    warmup: Option<&WarmupHook>,
) -> LoadReport {
    let mut report = LoadReport::default();
    versions.sort_by_key(|e| std::cmp::Reverse(e.version));
    let stored: Vec<u64> = versions.iter().map(|e| e.version).collect();
    let mut loaded = 0;
    for entry in versions {
        let aspired = match policy {
            VersionPolicy::Latest(n) => loaded < *n,
            other => other.wants(entry.version, &stored),
        };
        // Labelled versions stay loaded whatever the policy says.
        if !aspired && !labelled.contains(&entry.version) {
            continue;
        }
        let id = format!("{}@{}", entry.model, entry.version);
        let result = if registry.resolve(&entry.model, Some(entry.version)).is_ok() {
            Ok(())
        } else {
            load_and_publish(registry, runtime, entry, warmup)
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => {
                if aspired {
                    loaded += 1;
                }
                report.loaded.push(id);
            }
            Err(msg) => report.failed.push(format!("{id}: {msg}")),
        }
    }
    report
}

/// Opens, checks, loads and warms up one version. Blocking.
pub fn load_version(
    entry: &repository::Entry,
    runtime: &PluginRuntime,
    metrics: impl FnOnce() -> VersionMetrics,
    budget: Option<&Arc<DeviceBudget>>,
) -> anyhow::Result<Servable> {
    let bundle = Bundle::open(&entry.dir)?;
    if bundle.name() != entry.model || bundle.version() != entry.version {
        anyhow::bail!(
            "bundle.toml says {}@{} but the directory is {}/{}: the directory must be <name>/<version>",
            bundle.name(),
            bundle.version(),
            entry.model,
            entry.version
        );
    }
    if bundle.manifest.is_endpoint() {
        let endpoint = crate::routing::Endpoint::load(&bundle, runtime)?;
        return Ok(Servable {
            id: id_of(&bundle),
            bundle,
            runner: None,
            handler: None,
            endpoint: Some(endpoint),
            reservation: None,
        });
    }
    let spec = bundle
        .manifest
        .model
        .clone()
        .expect("checked by Bundle::open");
    let device = crate::backend::torch::select_device(
        crate::bundle::DeviceSpec::parse(&spec.device).map_err(anyhow::Error::msg)?,
    )?;
    let device = match device {
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".to_string(),
    };
    let model_bytes = crate::archive::list_files(&bundle.file(&spec.path))
        .map(|files| files.iter().map(|(_, m)| m.len()).sum())
        .ok()
        .filter(|&n: &u64| n > 0)
        .unwrap_or_else(|| {
            std::fs::metadata(bundle.file(&spec.path))
                .map(|m| m.len())
                .unwrap_or(0)
        });
    let reservation = match budget {
        Some(b) => Some(b.reserve(
            &format!("{}@{}", entry.model, entry.version),
            &device,
            model_bytes,
        )?),
        None => None,
    };
    let model = crate::backend::load(&bundle)?;
    let forward_time = warm_up(model.as_ref(), &spec, bundle.manifest.batching.as_ref())?;
    let batching = bundle.manifest.batching.as_ref();
    let threading = crate::backend::threading(
        crate::backend::fixed_threads(),
        forward_time,
        batching.and_then(|b| b.num_batch_threads.map(|n| n as usize)),
        device == "cpu",
    );
    tracing::debug!(model = %entry.model, version = entry.version, ?forward_time, ?threading, "forwards at once and libtorch intra-op threads");
    let runner = Arc::new(Runner::new(
        model,
        spec.inputs.clone(),
        batching,
        metrics(),
        threading,
    ));
    if let Some(t) = forward_time {
        // The first requests already know whether to run inline or in block_in_place.
        runner.seed_forward_time(t);
    }
    let handler = match &bundle.manifest.handler {
        Some(_) => Some(runtime.load_handler(&bundle, runner.clone())?),
        None => None,
    };
    Ok(Servable {
        id: id_of(&bundle),
        bundle,
        runner: Some(runner),
        handler,
        endpoint: None,
        reservation,
    })
}

/// Runs the model on zeros of its declared input shapes: twice with batch 1, then once
/// per allowed batch size, so that a model that cannot run fails here and TorchScript's
/// profiling executor has optimised for every batch shape before the first request.
/// Skipped when the inputs are not declared.
fn warm_up(
    model: &dyn crate::backend::Model,
    spec: &crate::bundle::ModelSpec,
    batching: Option<&crate::bundle::BatchingSpec>,
) -> anyhow::Result<Option<std::time::Duration>> {
    let declared = |i: &crate::bundle::TensorSpec| i.shape.iter().skip(1).all(|&d| d > 0);
    if spec.inputs.is_empty() || !spec.inputs.iter().all(declared) {
        return Ok(None);
    }
    let mut batch_one = None;
    let mut sizes = vec![1, 1];
    if let Some(b) = batching {
        sizes.extend(b.allowed_batch_sizes.iter().map(|&s| s as i64));
    }
    for batch in sizes {
        let inputs = spec
            .inputs
            .iter()
            .map(|i| {
                let mut shape: Vec<i64> = i.shape.iter().map(|&d| d.max(1)).collect();
                if let Some(first) = shape.first_mut() {
                    *first = batch;
                }
                // The manifest's shapes are the bundle author's: checked, and allocated
                // with try_reserve so that an absurd one fails the load, not the process.
                let bytes = crate::tensor::checked_bytes(&shape, i.dtype).ok_or_else(|| {
                    anyhow::anyhow!("input '{}': the declared shape {:?} is too large", i.name, i.shape)
                })?;
                let mut zeros = Vec::new();
                zeros.try_reserve_exact(bytes).map_err(|_| {
                    anyhow::anyhow!(
                        "input '{}': a warm-up batch of shape {shape:?} needs {bytes} bytes, which cannot be allocated; check the declared shape",
                        i.name
                    )
                })?;
                zeros.resize(bytes, 0);
                Tensor::new(i.dtype, shape, zeros).map_err(anyhow::Error::msg)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let started = Instant::now();
        model.forward(inputs).map_err(|e| {
            anyhow::anyhow!(
                "warm-up forward on zeros of the declared input shapes (batch {batch}) failed: {e}"
            )
        })?;
        if batch == 1 {
            batch_one = Some(started.elapsed());
        }
    }
    Ok(batch_one)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<VersionPolicy, String> {
        let v: toml::Value = toml::from_str(&format!("p = {text}")).unwrap();
        VersionPolicy::from_toml(&v["p"])
    }

    /// A servable with no model or plugin: enough for the registry's bookkeeping.
    fn bare(name: &str, version: u64) -> Arc<Servable> {
        let text = format!("[bundle]\nname = \"{name}\"\nversion = {version}\n");
        let bundle = Bundle {
            dir: std::path::PathBuf::from("/nonexistent"),
            manifest: crate::bundle::parse_manifest(&text).unwrap(),
        };
        Arc::new(Servable {
            id: id_of(&bundle),
            bundle,
            runner: None,
            handler: None,
            endpoint: None,
            reservation: None,
        })
    }

    fn state(r: &Registry, model: &str, v: u64) -> State {
        r.status(model)
            .unwrap()
            .into_iter()
            .find(|s| s.version == v)
            .unwrap()
            .state
    }

    #[tokio::test]
    async fn a_version_loaded_again_while_it_retires_stays_available() {
        let r = Arc::new(Registry::new(
            Arc::new(Metrics::new()),
            DeviceBudget::default(),
        ));
        let old = bare("m", 1);
        r.set_status("m", 1, State::Loading, None);
        r.publish_loaded(old.clone()).unwrap();
        let in_flight = old.clone(); // a slow request still holds the old copy
        let gone = Arc::downgrade(&old);
        drop(old);
        r.retire_version("m", 1);
        assert_eq!(state(&r, "m", 1), State::Unloading);
        // Loaded again while the old copy's last request runs.
        r.set_status("m", 1, State::Loading, None);
        let new = r.publish_loaded(bare("m", 1)).unwrap();
        drop(in_flight);
        // The retire task drops the old copy and settles its state in one step (this
        // runtime has one thread): once the copy is gone, the task has finished.
        while gone.upgrade().is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(state(&r, "m", 1), State::Available, "the new copy serves");
        assert!(Arc::ptr_eq(&r.resolve("m", Some(1)).unwrap(), &new));
    }

    #[test]
    fn a_load_that_finishes_after_an_unload_or_a_rival_load_does_not_publish() {
        let r = Arc::new(Registry::new(
            Arc::new(Metrics::new()),
            DeviceBudget::default(),
        ));
        // Unloaded (or deleted) while loading: the finished load must not serve.
        r.set_status("m", 1, State::Loading, None);
        r.retire_version("m", 1);
        let Err(err) = r.publish_loaded(bare("m", 1)) else {
            panic!("published after an unload")
        };
        assert!(err.contains("unloaded or deleted while it loaded"), "{err}");
        assert!(r.resolve("m", Some(1)).is_err());
        assert_eq!(state(&r, "m", 1), State::End);
        // Two loads of version 2 at once: the first publishes; the second neither replaces
        // it nor, when it fails, marks it END.
        r.set_status("m", 2, State::Loading, None);
        let first = r.publish_loaded(bare("m", 2)).unwrap();
        let second = r.publish_loaded(bare("m", 2)).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        r.record_load_failure("m", 2, "over the budget".into());
        assert_eq!(state(&r, "m", 2), State::Available);
    }

    #[test]
    fn device_budgets_refuse_past_the_limit_and_release_on_drop() {
        let budget = Arc::new(DeviceBudget::new(&BTreeMap::from([(
            "cpu".to_string(),
            10,
        )])));
        let a = budget.reserve("a@1", "cpu", 6 << 20).unwrap();
        let err = budget
            .reserve("b@1", "cpu", 6 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b@1 needs about 6 MiB on cpu, but 6 of its 10 MiB budget are in use"),
            "{err}"
        );
        assert!(
            budget.reserve("c@1", "cuda:0", 1 << 40).is_ok(),
            "no budget set for cuda:0"
        );
        drop(a);
        assert!(budget.reserve("b@1", "cpu", 6 << 20).is_ok());
    }

    #[test]
    fn policies_parse_and_choose_versions() {
        assert_eq!(policy("\"all\""), Ok(VersionPolicy::All));
        assert_eq!(policy("{ latest = 2 }"), Ok(VersionPolicy::Latest(2)));
        assert_eq!(
            policy("{ specific = [1, 3] }"),
            Ok(VersionPolicy::Specific(vec![1, 3]))
        );
        for bad in [
            "\"newest\"",
            "{ latest = 0 }",
            "{ latest = 1, specific = [1] }",
            "{ specific = [-1] }",
        ] {
            assert!(policy(bad).is_err(), "{bad}");
        }
        let stored = [1, 2, 3];
        let wanted = |p: &VersionPolicy| {
            stored
                .iter()
                .copied()
                .filter(|&v| p.wants(v, &stored))
                .collect::<Vec<_>>()
        };
        assert_eq!(wanted(&VersionPolicy::Latest(2)), vec![2, 3]);
        assert_eq!(wanted(&VersionPolicy::All), vec![1, 2, 3]);
        assert_eq!(wanted(&VersionPolicy::Specific(vec![1])), vec![1]);
    }
}
