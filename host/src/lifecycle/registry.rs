//! What serves now: every model's loaded versions, their states and labels, and the
//! handles requests hold.
//!
//! `api` reads the registry (resolve a name, a version or a label to a handle); only
//! [`super::manager`] changes it, under the model's guard. A request holds its handle
//! (an `Arc`) for its whole life, so a retired version keeps serving the requests that
//! hold it; the drop of its last handle tells the registry it has ended
//! ([`LastHandle`]), so nothing polls.

use crate::bundle::{Bundle, ModelSpec};
use crate::metrics::Metrics;
use crate::nn::Runner;
use crate::plugin::Plugin;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use super::loader::{DeviceBudget, Reservation};

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

/// A loaded version: a model, or an endpoint (variants behind a router). Cloning
/// clones the handle.
#[derive(Clone)]
pub enum Servable {
    Model(Arc<ModelVersion>),
    Endpoint(Arc<EndpointVersion>),
}

/// A loaded model version: its execution path and its handler plugin.
pub struct ModelVersion {
    pub bundle: Bundle,
    /// The model's signature (the manifest's `[model]`).
    pub spec: ModelSpec,
    pub runner: Arc<Runner>,
    pub handler: Option<Plugin>,
    /// Its share of the device's memory budget, released with the last handle.
    pub reservation: Option<Reservation>,
    /// `{model}@{version}`, made once: every answer names the version that served it.
    pub id: bytes::Bytes,
    pub(crate) last: LastHandle,
}

/// A loaded endpoint version: variants behind a compiled router.
pub struct EndpointVersion {
    pub bundle: Bundle,
    pub endpoint: crate::routing::Endpoint,
    pub id: bytes::Bytes,
    pub(crate) last: LastHandle,
}

/// Fires a signal when the version that owns it is dropped, i.e. when its last handle
/// goes: a retired version reaches END then.
#[derive(Default)]
pub(crate) struct LastHandle(Mutex<Option<tokio::sync::oneshot::Sender<()>>>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

pub(crate) fn id_of(bundle: &Bundle) -> bytes::Bytes {
    bytes::Bytes::from(format!("{}@{}", bundle.name(), bundle.version()))
}

impl ModelVersion {
    pub fn new(
        bundle: Bundle,
        spec: ModelSpec,
        runner: Arc<Runner>,
        handler: Option<Plugin>,
        reservation: Option<Reservation>,
    ) -> ModelVersion {
        ModelVersion {
            id: id_of(&bundle),
            bundle,
            spec,
            runner,
            handler,
            reservation,
            last: LastHandle::default(),
        }
    }
    pub fn name(&self) -> &str {
        self.bundle.name()
    }
    pub fn version(&self) -> u64 {
        self.bundle.version()
    }
    pub fn model_spec(&self) -> &ModelSpec {
        &self.spec
    }
    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }
}

impl EndpointVersion {
    pub fn new(bundle: Bundle, endpoint: crate::routing::Endpoint) -> EndpointVersion {
        EndpointVersion {
            id: id_of(&bundle),
            bundle,
            endpoint,
            last: LastHandle::default(),
        }
    }
}

impl Servable {
    pub fn bundle(&self) -> &Bundle {
        match self {
            Servable::Model(m) => &m.bundle,
            Servable::Endpoint(e) => &e.bundle,
        }
    }
    pub fn name(&self) -> &str {
        self.bundle().name()
    }
    pub fn version(&self) -> u64 {
        self.bundle().version()
    }
    pub fn as_model(&self) -> Option<&Arc<ModelVersion>> {
        match self {
            Servable::Model(m) => Some(m),
            Servable::Endpoint(_) => None,
        }
    }
    /// Where the version's files are now (an upload's, after its rename into the
    /// repository). Only while this is the one handle, as it is between load and publish.
    pub(crate) fn set_dir(&mut self, dir: std::path::PathBuf) {
        let bundle = match self {
            Servable::Model(m) => Arc::get_mut(m).map(|m| &mut m.bundle),
            Servable::Endpoint(e) => Arc::get_mut(e).map(|e| &mut e.bundle),
        };
        match bundle {
            Some(b) => b.dir = dir,
            None => tracing::warn!(
                model = %self.name(),
                version = self.version(),
                "a warm-up request still holds the new version; its directory is not updated"
            ),
        }
    }
    /// Arms the signal for when the version's last handle (this one included) drops.
    fn on_last_drop(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let last = match self {
            Servable::Model(m) => &m.last,
            Servable::Endpoint(e) => &e.last,
        };
        *last.0.lock().unwrap() = Some(tx);
        rx
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

/// Failed versions that are not stored (refused uploads) kept per model in the status
/// answer and `/metrics`: the newest ones, so that a client uploading bad bundles in a
/// loop cannot grow either without bound.
pub const FAILURES_KEPT: usize = 10;

#[derive(Default)]
struct ModelEntry {
    available: BTreeMap<u64, Servable>,
    status: BTreeMap<u64, VersionStatus>,
    /// Label to version; a labelled version stays loaded whatever the policy.
    labels: BTreeMap<String, u64>,
    /// Refused versions that nothing stores, oldest first (bounded by FAILURES_KEPT).
    refused: VecDeque<u64>,
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
    /// Counts every change of a version's state, for watchers (gRPC health's `Watch`).
    changes: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>, budget: DeviceBudget) -> Registry {
        Registry {
            models: RwLock::new(HashMap::new()),
            metrics,
            budget: Arc::new(budget),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Wakes whenever a version of any model changes state.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Wakes the watchers of [`Registry::changes`] for a change outside the registry
    /// (the server's readiness).
    pub fn touch(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The servable for `name` at `version`, or the highest available version.
    pub fn resolve(&self, name: &str, version: Option<u64>) -> Result<Servable, ResolveError> {
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

    /// The model version for `name` at `version` (or its highest); an endpoint is
    /// refused here, which is how nothing routes twice.
    pub fn resolve_model(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Arc<ModelVersion>, ResolveError> {
        match self.resolve(name, version)? {
            Servable::Model(m) => Ok(m),
            Servable::Endpoint(e) => Err(ResolveError::NotAvailable(
                name.to_string(),
                e.bundle.version(),
                "it is an endpoint, and a variant must be a model".into(),
            )),
        }
    }

    /// The model version a variant of an endpoint names now, following its label.
    pub fn resolve_variant(
        &self,
        v: &crate::bundle::VariantSpec,
    ) -> Result<Arc<ModelVersion>, ResolveError> {
        let version = match (&v.label, v.version) {
            (Some(label), _) => Some(self.label(&v.model, label)?),
            (None, version) => version,
        };
        self.resolve_model(&v.model, version)
    }

    /// The endpoint's default variant's model: what its metadata and ready routes
    /// describe, and what answers when the router fails open.
    pub fn default_target(
        &self,
        e: &crate::routing::Endpoint,
    ) -> Result<Arc<ModelVersion>, ResolveError> {
        self.resolve_variant(e.default())
    }

    /// The model version a handler's declared dependency names now.
    fn resolve_dependency(
        &self,
        dep: &crate::bundle::Dependency,
    ) -> Result<Arc<ModelVersion>, ResolveError> {
        use crate::bundle::Pin;
        let version = match &dep.pin {
            Pin::Latest => None,
            Pin::Version(v) => Some(*v),
            Pin::Label(l) => Some(self.label(&dep.model, l)?),
        };
        let m = self.resolve_model(&dep.model, version)?;
        if m.spec.backend == crate::bundle::BackendKind::None {
            return Err(ResolveError::NotAvailable(
                dep.model.clone(),
                m.version(),
                "it has no model (a model-less plugin bundle)".into(),
            ));
        }
        Ok(m)
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
}

/// Changes, for the manager alone (it holds the model's guard).
impl Registry {
    /// Points `label` at `version`. Unless `force`, the version must be AVAILABLE
    /// (TF Serving's rule).
    pub(super) fn set_label(
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
    pub(super) fn restore_labels(&self, model: &str, labels: BTreeMap<String, u64>) {
        let mut models = self.models.write().unwrap();
        models.entry(model.to_string()).or_default().labels = labels;
    }

    pub(super) fn set_loading(&self, model: &str, version: u64) {
        let mut models = self.models.write().unwrap();
        let entry = models.entry(model.to_string()).or_default();
        entry.refused.retain(|&v| v != version);
        self.record_state(entry, model, version, State::Loading, None);
    }

    /// AVAILABLE: requests resolve to it from now.
    pub(super) fn publish(&self, servable: Servable) {
        let (model, v) = (servable.name().to_string(), servable.version());
        let mut models = self.models.write().unwrap();
        let entry = models.entry(model.clone()).or_default();
        entry.refused.retain(|&r| r != v);
        self.record_state(entry, &model, v, State::Available, None);
        let replaced = entry.available.insert(v, servable);
        drop(models); // a replaced handle may be the last: dropped outside the lock
        drop(replaced);
    }

    /// A version that failed to load or warm up: END with its error. `stored`: whether
    /// the source holds it (a failed start-up load) or not (a refused upload: one of the
    /// newest [`FAILURES_KEPT`] kept, older ones forgotten with their metric series).
    pub(super) fn fail(&self, model: &str, version: u64, msg: String, stored: bool) {
        let mut models = self.models.write().unwrap();
        let entry = models.entry(model.to_string()).or_default();
        if entry.available.contains_key(&version) {
            return; // a copy of it serves (a failed duplicate must not mark it END)
        }
        self.record_state(entry, model, version, State::End, Some(msg));
        self.metrics.forget_version(model, version);
        entry.refused.retain(|&v| v != version);
        if stored {
            return;
        }
        entry.refused.push_back(version);
        while entry.refused.len() > FAILURES_KEPT {
            let old = entry.refused.pop_front().expect("longer than the bound");
            if let Some(s) = entry.status.remove(&old) {
                self.metrics.forget_state(model, old, s.state.as_str());
            }
        }
    }

    /// A version that is stored but does not serve (an upload the policy does not want):
    /// END without an error.
    pub(super) fn end(&self, model: &str, version: u64) {
        let mut models = self.models.write().unwrap();
        let entry = models.entry(model.to_string()).or_default();
        let state = entry.status.get(&version).map(|s| s.state);
        if entry.available.contains_key(&version) || state == Some(State::Unloading) {
            return; // serving, or retiring: its last handle's drop ends it
        }
        // Stored now: no longer one of the refused uploads that may be forgotten.
        entry.refused.retain(|&v| v != version);
        self.record_state(entry, model, version, State::End, None);
        self.metrics.forget_version(model, version);
    }

    /// Takes versions out of service: they stop taking new requests (UNLOADING) and
    /// reach END when the last request holding them finishes.
    pub(super) fn retire(self: &Arc<Self>, model: &str, versions: &BTreeSet<u64>) {
        let retired: Vec<Servable> = {
            let mut models = self.models.write().unwrap();
            let Some(entry) = models.get_mut(model) else {
                return;
            };
            let gone: Vec<Servable> = versions
                .iter()
                .filter_map(|v| entry.available.remove(v))
                .collect();
            for s in &gone {
                self.record_state(entry, model, s.version(), State::Unloading, None);
            }
            gone
        };
        for servable in retired {
            let version = servable.version();
            let ended = servable.on_last_drop();
            drop(servable);
            let (registry, model) = (self.clone(), model.to_string());
            tokio::spawn(async move {
                let _ = ended.await;
                if registry.retired(&model, version) {
                    tracing::info!(model = %model, version, "version retired (END)");
                }
            });
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
        // Watchers read the registry after the write lock this runs under is released.
        self.changes.send_modify(|n| *n += 1);
        entry.status.insert(
            version,
            VersionStatus {
                version,
                state,
                error,
            },
        );
    }
}

impl crate::nn::ModelLookup for Registry {
    fn dependency(&self, dep: &crate::bundle::Dependency) -> Result<Arc<Runner>, String> {
        self.resolve_dependency(dep)
            .map(|m| m.runner.clone())
            .map_err(|e| e.to_string())
    }
}
