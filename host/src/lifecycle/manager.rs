//! The one owner of a model's life (TF Serving's AspiredVersionsManager): every trigger
//! (start-up, the poller, an upload, a delete, a label change, Triton's load and unload)
//! takes the model's guard and calls [`Manager::reconcile`], which asks
//! [`policy::aspired`] what should serve, loads what is missing (newest first, each one
//! published before anything retires, so a swap never drops a request), and retires
//! what is no longer wanted. A version that fails to load is remembered with its files'
//! fingerprint and never retried until they change, so it cannot replace a working one.
//!
//! Loads, publishes and retirements happen only here, under the guard: no load of a
//! version twice at once, no publish after a delete, no lost END. `api` calls the
//! triggers; `upload` checks a bundle and hands the loaded version to
//! [`Manager::install`].

use super::loader::{Load, LoadError};
use super::objects::{ObjectRepo, WriteError};
use super::policy::{self, Policies};
use super::registry::{Registry, Servable};
use super::source::{Fingerprint, LocalSource};
use super::upload::{Stored, UploadError, Uploads};
use crate::repository::{Entry, VersionMeta};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// What the manager knows of one model beyond the registry; behind the model's guard.
#[derive(Default)]
struct ModelState {
    /// Unloaded on request (Triton's repository API): nothing serves until it is loaded.
    unloaded: bool,
    /// Stored versions that may load: present at start-up, installed by an upload, or
    /// copied in by hand and unchanged for a poll interval.
    admitted: BTreeSet<u64>,
    /// Copied in by hand and seen once: the fingerprint to see again before admitting.
    pending: BTreeMap<u64, Fingerprint>,
    /// Failed to load, with the fingerprint they had: retried once their files change.
    failed: BTreeMap<u64, Option<Fingerprint>>,
    /// Being deleted: no longer wanted, whatever the policy.
    deleting: BTreeSet<u64>,
    /// Refused by a device budget (not the bundle's fault): tried again by the next
    /// trigger and every poll, not remembered as failed.
    no_room: BTreeSet<u64>,
    /// Serving versions loaded from the local repository, with their files' fingerprint
    /// then: files edited in place (a rebuilt plugin) reload the version once they settle.
    loaded: BTreeMap<u64, Option<Fingerprint>>,
    /// Serving versions whose files changed: the fingerprint to see again before reloading.
    changing: BTreeMap<u64, Fingerprint>,
    /// Serving versions whose changed files have settled: the next reconcile reloads them.
    reload: BTreeSet<u64>,
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// `model@version` of every version that serves after it.
    pub loaded: Vec<String>,
    /// `model@version: error` of every load that failed in it.
    pub failed: Vec<String>,
    /// The models with a version in `failed`.
    pub failed_models: std::collections::BTreeSet<String>,
}

/// The model's life, for every model.
pub struct Manager {
    /// The repository, or with an object store the replica's cache of it.
    pub source: LocalSource,
    /// The object-store repository the cache syncs from and writes go through
    /// (`--repository s3://...`); `None` for a local directory.
    pub objects: Option<Arc<ObjectRepo>>,
    pub registry: Arc<Registry>,
    pub loader: Arc<dyn Load>,
    pub policies: Policies,
    pub limits: crate::archive::Limits,
    /// Uploads at once, and the versions being stored now.
    pub uploads: Uploads,
    /// One per model the source holds or an upload stored: triggers check that a model
    /// exists before they make its guard, so names from requests cannot grow this map.
    guards: Mutex<HashMap<String, Arc<tokio::sync::Mutex<ModelState>>>>,
    /// Writes to the object store per model, counted (see `sync_bucket`).
    written: Mutex<HashMap<String, u64>>,
}

fn internal(e: impl std::fmt::Display) -> UploadError {
    UploadError::Internal(e.to_string())
}

/// A write through the bucket that failed, as the API answers it.
fn bucket_error(e: WriteError) -> UploadError {
    match e {
        WriteError::Conflict(m) => UploadError::Conflict(m),
        WriteError::Store(m) => UploadError::Unavailable(format!(
            "the model repository's object store failed, nothing was changed: {m}; retry"
        )),
        WriteError::Incomplete(m) => UploadError::Unavailable(m),
        WriteError::Taken(_) => UploadError::Conflict("the version is stored".into()),
    }
}

impl Manager {
    pub fn new(
        source: LocalSource,
        registry: Arc<Registry>,
        loader: Arc<dyn Load>,
        policies: Policies,
        limits: crate::archive::Limits,
        uploads: Uploads,
    ) -> Manager {
        Manager {
            source,
            registry,
            loader,
            policies,
            limits,
            uploads,
            objects: None,
            guards: Default::default(),
            written: Default::default(),
        }
    }

    /// With an object-store repository: `source` must be its cache.
    pub fn with_objects(mut self, objects: Arc<ObjectRepo>) -> Manager {
        self.objects = Some(objects);
        self
    }

    fn guard(&self, model: &str) -> Arc<tokio::sync::Mutex<ModelState>> {
        self.guards
            .lock()
            .unwrap()
            .entry(model.to_string())
            .or_default()
            .clone()
    }

    /// Brings one model to what its policy wants (see the module doc).
    pub async fn reconcile(&self, model: &str) -> LoadReport {
        let guard = self.guard(model);
        let mut st = guard.lock().await;
        self.reconcile_locked(model, &mut st, None).await
    }

    /// The reconcile itself, under the model's guard. `arrival`: a version an upload has
    /// loaded and installed, published instead of loaded again if it is wanted.
    async fn reconcile_locked(
        &self,
        model: &str,
        st: &mut ModelState,
        mut arrival: Option<Servable>,
    ) -> LoadReport {
        let on_disk = self.source.versions(model);
        self.reload_edited(model, st, &on_disk).await;
        st.admitted.retain(|v| on_disk.contains_key(v));
        st.failed.retain(|v, _| on_disk.contains_key(v));
        let stored: BTreeSet<u64> = st.admitted.difference(&st.deleting).copied().collect();
        let policy = self.policies.get(model);
        let mut report = LoadReport::default();
        let arrival_version = arrival.as_ref().map(|a| a.version());
        st.no_room.clear();
        let want = loop {
            let labelled: BTreeSet<u64> = self.registry.labels(model).into_values().collect();
            let failed: BTreeSet<u64> = st.failed.keys().chain(&st.no_room).copied().collect();
            let want = if st.unloaded {
                BTreeSet::new()
            } else {
                policy::aspired(policy, &stored, &labelled, &failed)
            };
            let serving = self.registry.available_versions(model);
            // Newest first: under `latest = N` a failure makes room for an older one.
            let Some(&version) = want.iter().rev().find(|v| !serving.contains(v)) else {
                break want;
            };
            let entry = on_disk[&version].clone();
            let loaded = match arrival.take_if(|a| a.version() == version) {
                Some(a) => Ok(a),
                None => {
                    tracing::info!(model, version, "loading");
                    self.registry.set_loading(model, version);
                    let started = std::time::Instant::now();
                    let loaded = self.loader.load(entry.clone()).await;
                    if let Ok(s) = &loaded {
                        log_available(s, started.elapsed());
                    }
                    loaded
                }
            };
            let from_source = arrival_version != Some(version);
            match loaded {
                Ok(servable) => {
                    if from_source {
                        // A version copied in by hand gets the record an upload writes,
                        // before anyone sees it serve.
                        let (source, model, dir) =
                            (self.source.clone(), model.to_string(), entry.dir.clone());
                        let refresh = self.objects.is_none();
                        let _ = tokio::task::spawn_blocking(move || {
                            source.ensure_meta(&model, version, &dir, refresh)
                        })
                        .await;
                        if self.objects.is_none() {
                            st.loaded
                                .insert(version, LocalSource::fingerprint(&entry.dir));
                        }
                    }
                    self.registry.publish(servable);
                }
                Err(e) => {
                    let no_room = matches!(e, LoadError::NoRoom(_));
                    let msg = e.to_string();
                    tracing::warn!(model, version, "version failed to load: {msg}");
                    report.failed.push(format!("{model}@{version}: {msg}"));
                    self.registry.fail(model, version, msg, true);
                    if no_room {
                        st.no_room.insert(version);
                    } else {
                        st.failed
                            .insert(version, LocalSource::fingerprint(&entry.dir));
                    }
                }
            }
        };
        // Only now, with every wanted version serving, do the others retire.
        let serving: BTreeSet<u64> = self
            .registry
            .available_versions(model)
            .into_iter()
            .collect();
        let unwanted: BTreeSet<u64> = serving.difference(&want).copied().collect();
        if !unwanted.is_empty() {
            tracing::info!(model, versions = ?unwanted, "retiring versions the policy no longer wants");
            self.registry.retire(model, &unwanted);
        }
        st.loaded.retain(|v, _| want.contains(v));
        if let Some(a) = arrival {
            // Stored, but not wanted: it never serves.
            self.registry.end(model, a.version());
        }
        report.loaded = want.iter().map(|v| format!("{model}@{v}")).collect();
        report
    }
}

/// Runs a trigger to its end on a task of its own: a client that goes away (hyper drops
/// its handler) must not cut a reconcile half-way, leaving a version marked for deletion
/// or LOADING for good.
async fn to_end(
    trigger: impl std::future::Future<Output = Result<(), UploadError>> + Send + 'static,
) -> Result<(), UploadError> {
    tokio::spawn(trigger).await.map_err(internal)?
}

fn log_available(s: &Servable, took: std::time::Duration) {
    match s {
        Servable::Model(m) => tracing::info!(
            model = %m.name(), version = m.version(),
            device = %m.runner.device(),
            forwards_at_once = m.runner.threading().concurrency,
            threads = %m.runner.threading().intra_op.to_json(),
            plugin = m.handler.as_ref().map(|p| p.name()).unwrap_or("-"),
            took = ?took, "version AVAILABLE"
        ),
        Servable::Endpoint(e) => tracing::info!(
            model = %e.bundle.name(), version = e.bundle.version(),
            router = e.endpoint.router.name(),
            took = ?took, "version AVAILABLE"
        ),
    }
}

/// The triggers.
impl Manager {
    /// Start-up: every version in the repository is admitted and every model reconciled.
    /// A version that fails is recorded with its error (visible in the status API) and
    /// does not stop the others.
    pub async fn load_repository(&self) -> anyhow::Result<LoadReport> {
        let (entries, problems) = self.source.scan()?;
        let mut report = LoadReport::default();
        for p in problems {
            tracing::warn!(path = %p.path.display(), "skipped: {}", p.reason);
            report
                .failed
                .push(format!("{}: {}", p.path.display(), p.reason));
        }
        let mut by_model: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for e in entries {
            by_model.entry(e.model).or_default().push(e.version);
        }
        for (model, versions) in by_model {
            let guard = self.guard(&model);
            let mut st = guard.lock().await;
            st.admitted.extend(versions);
            self.registry
                .restore_labels(&model, self.source.labels(&model));
            let r = self.reconcile_locked(&model, &mut st, None).await;
            if !r.failed.is_empty() {
                report.failed_models.insert(model.clone());
            }
            report.loaded.extend(r.loaded);
            report.failed.extend(r.failed);
        }
        Ok(report)
    }

    /// Watches the repository (TF Serving's file-system source): a version copied in by
    /// hand is admitted once it has not changed for a full `interval` (a half-copied
    /// directory is never loaded), a failed one once its files change and settle again,
    /// and a removed one leaves; each change reconciles its model. A model whose
    /// reconcile is running is looked at again next round. Runs until the process ends.
    pub async fn poll(self: Arc<Self>, interval: std::time::Duration) {
        // While the bucket cannot be reached, polls back off to a minute at most.
        let mut wait = interval;
        loop {
            tokio::time::sleep(wait).await;
            if let Some(objects) = self.objects.clone() {
                match self.sync_bucket(&objects).await {
                    Ok(()) => wait = interval,
                    Err(e) => {
                        wait = (wait * 2).min(interval.max(std::time::Duration::from_secs(60)));
                        tracing::warn!(repository = %objects.url, retry_in = ?wait,
                            "cannot sync from the object store ({e}); serving what the cache holds");
                    }
                }
            }
            let source = self.source.clone();
            let entries = match tokio::task::spawn_blocking(move || source.scan()).await {
                Ok(Ok((entries, _))) => entries,
                Ok(Err(e)) => {
                    tracing::warn!("the repository poll could not scan the repository: {e:#}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("the repository poll failed: {e}");
                    continue;
                }
            };
            let mut by_model: BTreeMap<String, BTreeMap<u64, Entry>> = BTreeMap::new();
            for e in entries {
                by_model
                    .entry(e.model.clone())
                    .or_default()
                    .insert(e.version, e);
            }
            let known: Vec<String> = self.guards.lock().unwrap().keys().cloned().collect();
            for model in known {
                by_model.entry(model).or_default();
            }
            for (model, present) in by_model {
                let guard = self.guard(&model);
                let Ok(mut st) = guard.try_lock() else {
                    continue;
                };
                if self.settle(&mut st, &present) {
                    self.reconcile_locked(&model, &mut st, None).await;
                }
            }
        }
    }

    /// One poll's news for a model; true when what may load has changed.
    fn settle(&self, st: &mut ModelState, present: &BTreeMap<u64, Entry>) -> bool {
        // A version a device budget refused is tried again: the room may be there now.
        let mut changed = !st.no_room.is_empty();
        let before = st.admitted.len();
        st.admitted.retain(|v| present.contains_key(v));
        changed |= st.admitted.len() != before;
        // A failed version whose files changed is treated as a new copy.
        let changed_failures: Vec<u64> = st
            .failed
            .iter()
            .filter(|(v, fp)| {
                present
                    .get(v)
                    .is_some_and(|e| LocalSource::fingerprint(&e.dir) != **fp)
            })
            .map(|(v, _)| *v)
            .collect();
        for v in changed_failures {
            st.failed.remove(&v);
            st.admitted.remove(&v);
        }
        st.pending.retain(|v, _| present.contains_key(v));
        changed |= self.settle_edits(st, present);
        for (v, entry) in present {
            if st.admitted.contains(v) || st.deleting.contains(v) {
                continue;
            }
            let Some(fp) = LocalSource::fingerprint(&entry.dir) else {
                continue;
            };
            if st.pending.get(v) == Some(&fp) && crate::bundle::is_version_dir(&entry.dir) {
                tracing::info!(model = %entry.model, version = v, "new version in the repository");
                st.pending.remove(v);
                st.admitted.insert(*v);
                changed = true;
            } else {
                st.pending.insert(*v, fp); // new or still changing: wait a full interval
            }
        }
        changed
    }

    /// An upload's last step: the version, checked and loaded, is moved into the
    /// repository and handed to reconcile, which serves it if the policy wants it.
    /// Under the guard, so of two uploads of one version exactly one is stored.
    pub async fn install(
        &self,
        model: &str,
        unpacked: &std::path::Path,
        meta: VersionMeta,
        mut servable: Servable,
    ) -> Result<Stored, UploadError> {
        let version = servable.version();
        let guard = self.guard(model);
        let mut st = guard.lock().await;
        let stored = Stored {
            name: model.to_string(),
            version,
            digest: meta.digest.clone(),
            created: true,
            state: None,
            note: None,
        };
        if self.source.is_stored(model, version) {
            return self.already_stored(model, version, stored);
        }
        if let Some(objects) = &self.objects {
            // Claim, files, record: the bucket first, so that a version is in a cache
            // only once every replica can sync it.
            self.wrote(model);
            match objects.publish(model, version, unpacked, &meta).await {
                Ok(()) => {}
                Err(WriteError::Taken(Some(record))) if record.digest == stored.digest => {
                    return Ok(Stored {
                        created: false,
                        ..stored
                    })
                }
                Err(WriteError::Taken(Some(record))) => {
                    return Err(UploadError::Conflict(format!(
                        "version {version} of '{model}' exists with digest {}; this archive is {}: upload it as a new version",
                        record.digest, stored.digest
                    )))
                }
                Err(WriteError::Taken(None)) => {
                    return Err(UploadError::Conflict(format!(
                        "version {version} of '{model}' is being stored through another replica (or such an \
                         upload was interrupted: DELETE the version to clear its claim); upload it as a new version"
                    )))
                }
                Err(e) => return Err(bucket_error(e)),
            }
        }
        let dir = self
            .source
            .install(model, version, unpacked, &meta)
            .map_err(internal)?;
        servable.set_dir(dir);
        st.admitted.insert(version);
        st.failed.remove(&version);
        st.pending.remove(&version);
        self.reconcile_locked(model, &mut st, Some(servable)).await;
        if self.registry.resolve(model, Some(version)).is_ok() {
            tracing::info!(model, version, digest = %stored.digest, "version uploaded and AVAILABLE");
            return Ok(Stored {
                state: Some("AVAILABLE"),
                ..stored
            });
        }
        // Stored, but the policy serves other versions (e.g. `latest 1` and a newer one).
        let note = if st.unloaded {
            format!(
                "version {version} is stored but not served: the model is unloaded \
                 (POST /v2/repository/models/{model}/load serves it again)"
            )
        } else {
            format!(
                "version {version} is stored but not served: the model's version policy ({}) serves {:?}; \
                 give it a label, or change the policy ([policies] or latest_versions in the config)",
                self.policies.get(model).describe(),
                self.registry.available_versions(model)
            )
        };
        tracing::info!(model, version, "version uploaded; {note}");
        Ok(Stored {
            state: Some("END"),
            note: Some(note),
            ..stored
        })
    }

    /// The answer to an upload of a version that is stored: the same content is
    /// accepted as stored (200), other content is a conflict (409).
    pub(super) fn already_stored(
        &self,
        model: &str,
        version: u64,
        stored: Stored,
    ) -> Result<Stored, UploadError> {
        match self.source.meta(model, version) {
            Some(m) if m.digest == stored.digest => Ok(Stored {
                created: false,
                ..stored
            }),
            Some(m) => Err(UploadError::Conflict(format!(
                "version {version} of '{model}' exists with digest {}; this archive is {}: upload it as a new version",
                m.digest, stored.digest
            ))),
            None => Err(UploadError::Conflict(format!(
                "version {version} of '{model}' exists (copied in by hand, no recorded digest); upload it as a new version"
            ))),
        }
    }

    /// Points a label at a version, stores it, and reconciles: the labelled version
    /// serves whatever the policy, and one a label left may retire.
    pub async fn set_label(
        self: &Arc<Self>,
        model: &str,
        label: &str,
        version: u64,
        force: bool,
    ) -> Result<(), UploadError> {
        let (this, model, label) = (self.clone(), model.to_string(), label.to_string());
        to_end(async move { this.set_label_now(&model, &label, version, force).await }).await
    }

    async fn set_label_now(
        &self,
        model: &str,
        label: &str,
        version: u64,
        force: bool,
    ) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        crate::names::check_name("label", label).map_err(UploadError::BadRequest)?;
        crate::names::check_version(version).map_err(UploadError::BadRequest)?;
        // Checked before the guard too, so that unknown names never get a guard.
        let unknown = || UploadError::NotFound(format!("model '{model}' is not found"));
        if self.registry.status(model).is_none() {
            return Err(unknown());
        }
        let guard = self.guard(model);
        let mut st = guard.lock().await;
        if self.registry.status(model).is_none() {
            return Err(unknown());
        }
        if force && !self.source.is_stored(model, version) {
            return Err(UploadError::NotFound(format!(
                "version {version} of '{model}' is not stored"
            )));
        }
        let before = self.registry.labels(model);
        self.registry
            .set_label(model, label, version, force)
            .map_err(UploadError::Conflict)?;
        match &self.objects {
            // Merged with what other replicas changed meanwhile (If-Match, read again).
            Some(objects) => {
                self.wrote(model);
                let merged = objects.set_label(model, label, version).await;
                match merged {
                    Ok(labels) => self.registry.restore_labels(model, labels),
                    Err(e) => {
                        self.registry.restore_labels(model, before);
                        return Err(bucket_error(e));
                    }
                }
            }
            None => self
                .source
                .write_labels(model, &self.registry.labels(model))
                .map_err(internal)?,
        }
        self.reconcile_locked(model, &mut st, None).await;
        Ok(())
    }

    /// Deletes a stored version: the version the policy wants next is loaded first, then
    /// this one retires (requests in flight finish) and leaves the disk. A labelled
    /// version must lose its labels first.
    pub async fn delete(self: &Arc<Self>, model: &str, version: u64) -> Result<(), UploadError> {
        let (this, model) = (self.clone(), model.to_string());
        to_end(async move { this.delete_now(&model, version).await }).await
    }

    async fn delete_now(&self, model: &str, version: u64) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        crate::names::check_version(version).map_err(UploadError::BadRequest)?;
        let not_stored =
            || UploadError::NotFound(format!("version {version} of '{model}' is not stored"));
        // In the bucket but not in this cache: a claim an interrupted upload left, or a
        // version not synced yet. Deleting it clears it from the bucket.
        let in_bucket_only = match &self.objects {
            Some(o) if !self.source.is_stored(model, version) => {
                match o.is_stored(model, version).await {
                    Some(stored) => stored,
                    None => {
                        return Err(UploadError::Unavailable(format!(
                            "the model repository's object store cannot be reached to find version \
                             {version} of '{model}'; retry"
                        )))
                    }
                }
            }
            _ => false,
        };
        // Checked before the guard too, so that unknown names never get a guard.
        if !in_bucket_only && !self.source.is_stored(model, version) {
            return Err(not_stored());
        }
        let guard = self.guard(model);
        let mut st = guard.lock().await;
        if let (Some(objects), true) = (&self.objects, in_bucket_only) {
            return objects
                .delete_version(model, version)
                .await
                .map_err(bucket_error);
        }
        if !self.source.is_stored(model, version) {
            return Err(not_stored());
        }
        if let Some((label, _)) = self
            .registry
            .labels(model)
            .iter()
            .find(|(_, &v)| v == version)
        {
            return Err(UploadError::Conflict(format!(
                "version {version} of '{model}' carries the label '{label}'; move the label first"
            )));
        }
        if let Some(objects) = &self.objects {
            // The bucket first: every replica drops the version at its next poll.
            self.wrote(model);
            objects
                .delete_version(model, version)
                .await
                .map_err(bucket_error)?;
        }
        st.deleting.insert(version);
        self.reconcile_locked(model, &mut st, None).await;
        let removed = self.source.remove(model, version);
        st.deleting.remove(&version);
        st.admitted.remove(&version);
        st.failed.remove(&version);
        self.registry.end(model, version);
        removed.map_err(internal)
    }

    /// Triton's `load`: every version in the repository is admitted (the caller says the
    /// files are complete; failed ones are tried again) and the model reconciled.
    /// `full_errors`: the caller may see a failed load's whole error (else its public
    /// reason, `names::public_reason`).
    pub async fn load_model(
        self: &Arc<Self>,
        model: &str,
        full_errors: bool,
    ) -> Result<(), UploadError> {
        let (this, model) = (self.clone(), model.to_string());
        to_end(async move { this.load_model_now(&model, full_errors).await }).await
    }

    async fn load_model_now(&self, model: &str, full_errors: bool) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        if self.source.versions(model).is_empty() {
            // Before the guard, so that unknown names never get a guard.
            return Err(UploadError::NotFound(format!(
                "model '{model}' is not in the repository"
            )));
        }
        let guard = self.guard(model);
        let mut st = guard.lock().await;
        let source = self.source.clone();
        let name = model.to_string();
        let present = tokio::task::spawn_blocking(move || source.versions(&name))
            .await
            .map_err(internal)?;
        if present.is_empty() {
            return Err(UploadError::NotFound(format!(
                "model '{model}' is not in the repository"
            )));
        }
        st.unloaded = false;
        st.admitted.extend(present.keys());
        st.failed.clear();
        st.pending.clear();
        if self.registry.status(model).is_none() {
            self.registry
                .restore_labels(model, self.source.labels(model));
        }
        let report = self.reconcile_locked(model, &mut st, None).await;
        if !self.registry.available_versions(model).is_empty() {
            return Ok(());
        }
        if report.failed.is_empty() {
            return Err(UploadError::BadRequest(format!(
                "no version of '{model}' serves: its version policy ({}) wants none of the stored versions {:?}",
                self.policies.get(model).describe(),
                present.keys().collect::<Vec<_>>()
            )));
        }
        let shown = |m: String| {
            if full_errors {
                m
            } else {
                crate::names::public_reason(&m)
            }
        };
        Err(UploadError::Invalid(
            report.failed.into_iter().map(shown).collect(),
        ))
    }

    /// Triton's `unload`: every loaded version out of service (requests in flight
    /// finish); nothing of the model loads again until it is loaded on request.
    pub async fn unload_model(self: &Arc<Self>, model: &str) -> Result<(), UploadError> {
        let (this, model) = (self.clone(), model.to_string());
        to_end(async move { this.unload_model_now(&model).await }).await
    }

    async fn unload_model_now(&self, model: &str) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        if self.registry.status(model).is_none() {
            return Err(UploadError::NotFound(format!(
                "model '{model}' is not found"
            )));
        }
        let guard = self.guard(model);
        let mut st = guard.lock().await;
        st.unloaded = true;
        self.reconcile_locked(model, &mut st, None).await;
        Ok(())
    }
}

#[path = "manager_edits.rs"]
mod edits;
#[path = "manager_sync.rs"]
mod sync;

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
