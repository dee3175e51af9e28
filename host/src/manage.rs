//! Managing the stored versions: uploads, labels and deletes.
//!
//! Receiving a bundle: the archive is streamed to a file in the repository's scratch
//! area, unpacked with the archive rules, checked (manifest, paths, plugin imports, the
//! model loads and warms up), renamed into `<repo>/<model>/<version>/` in one step, and
//! published; versions beyond the policy are then retired without dropping a request.
//!
//! This module knows files and the lifecycle; `api` maps [`UploadError`] to statuses.

use crate::archive::{self, Limits};
use crate::bundle::Bundle;
use crate::lifecycle::{self, Registry};
use crate::plugin::PluginRuntime;
use crate::repository::{self, Entry, VersionMeta};
use futures::{Stream, StreamExt};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// What an upload needs of the server.
pub struct Manager {
    pub root: PathBuf,
    pub runtime: Arc<PluginRuntime>,
    pub registry: Arc<Registry>,
    pub limits: Limits,
    /// Which versions each model keeps loaded.
    pub policies: lifecycle::Policies,
    /// Replays warm-up requests; set once the request path exists.
    pub warmup: std::sync::OnceLock<lifecycle::WarmupHook>,
    /// Models unloaded on request (Triton's repository API): the poller leaves them.
    pub unloaded: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Uploads at once, and the versions being stored now.
    pub uploads: Uploads,
}

/// Bounds uploads: `max_concurrent_uploads` are spooled, unpacked and checked at once
/// (so scratch disk use is at most that many times an archive and its unpacked files),
/// and later ones wait their turn rather than being refused, so that a second upload of
/// a version being stored meets its 409, never a 429.
pub struct Uploads {
    slots: Arc<tokio::sync::Semaphore>,
    /// (model, version) being stored now.
    storing: std::sync::Mutex<std::collections::BTreeSet<(String, u64)>>,
    /// Stores running now (past their body), and a signal when one ends.
    running: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

impl Uploads {
    pub fn new(at_once: usize) -> Uploads {
        Uploads {
            slots: Arc::new(tokio::sync::Semaphore::new(at_once.max(1))),
            storing: Default::default(),
            running: Default::default(),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// Waits until no store runs, at most `within`; false when some still run.
    pub async fn settle(&self, within: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering;
        let all_ended = async {
            loop {
                let ended = self.ended.notified();
                if self.running.load(Ordering::Acquire) == 0 {
                    return;
                }
                ended.await;
            }
        };
        tokio::time::timeout(within, all_ended).await.is_ok()
    }
}

/// A store running, counted until it ends.
struct Running<'a>(&'a Uploads);

impl<'a> Running<'a> {
    fn start(uploads: &'a Uploads) -> Running<'a> {
        uploads
            .running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Running(uploads)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

/// A version being stored, released when the upload ends however it ends.
struct Storing<'a> {
    uploads: &'a Uploads,
    key: (String, u64),
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        self.uploads.storing.lock().unwrap().remove(&self.key);
    }
}

#[derive(Debug)]
pub enum UploadError {
    /// 400, with every reason.
    Invalid(Vec<String>),
    /// 400, for a request that is not a bundle (a label's name).
    BadRequest(String),
    /// 409: that version exists with other content.
    Conflict(String),
    /// 409: a device's memory budget has no room for the model now.
    NoRoom(String),
    /// 413.
    TooLarge(String),
    /// 404.
    NotFound(String),
    /// 408: the body stopped arriving.
    SlowClient(String),
    /// 500.
    Internal(String),
}

/// A stored version.
#[derive(Debug, serde::Serialize)]
pub struct Stored {
    pub name: String,
    pub version: u64,
    pub digest: String,
    /// False when the same content was stored already (an idempotent re-upload).
    #[serde(skip)]
    pub created: bool,
    /// The version's state once the upload is done: AVAILABLE, or END when the model's
    /// version policy does not serve it (an older version under `latest N`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// Why a stored version does not serve, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn internal(e: impl std::fmt::Display) -> UploadError {
    UploadError::Internal(e.to_string())
}

impl Manager {
    /// Receives an uploaded archive and stores it as a new version. `admin`: the caller
    /// proved it holds the token, and may see a failed load's full error.
    pub async fn receive<S, E>(
        self: &Arc<Self>,
        model: &str,
        mut body: S,
        admin: bool,
    ) -> Result<Stored, UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::error::Error + 'static,
    {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        let broke_off = |e: E| {
            // A body that stopped arriving is the client's slowness (408), not a bad bundle.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                if let Some(t) = c.downcast_ref::<crate::connections::BodyTimeout>() {
                    return UploadError::SlowClient(t.to_string());
                }
                cause = c.source();
            }
            UploadError::Invalid(vec![format!("the upload broke off: {e}")])
        };
        // 0. The first bytes must be a gzip'd tar before an upload slot is taken or
        //    anything is written to disk. Checked again only when the head has doubled, so
        //    an upload in one-byte pieces costs no more than one in large ones.
        let mut head = Vec::new();
        let mut checked_at = 0;
        let ended = loop {
            let chunk = body.next().await;
            let whole = chunk.is_none();
            if let Some(chunk) = chunk {
                head.extend_from_slice(&chunk.map_err(broke_off)?);
            }
            if head.len() as u64 > self.limits.max_archive_bytes {
                return Err(UploadError::TooLarge(format!(
                    "the archive is larger than the upload limit of {} bytes (max_upload_bytes)",
                    self.limits.max_archive_bytes
                )));
            }
            let check_now = whole
                || head.len() >= (2 * checked_at).max(512)
                || head.len() >= archive::START_BYTES;
            if !check_now {
                continue;
            }
            checked_at = head.len();
            match archive::check_start(&head, whole).map_err(|e| UploadError::Invalid(vec![e]))? {
                archive::Start::Tar => break whole,
                archive::Start::NeedMore => continue,
            }
        };
        // Held by the work that follows, to its end: a client that goes away does not
        // free the slot while its unpack or load still runs.
        let slot = self
            .uploads
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(internal)?;
        let scratch = repository::scratch(&self.root).map_err(internal)?;
        // 1. Stream the archive to disk, never whole in memory.
        let archive_path = scratch.path().join("bundle.tar.gz");
        let mut file =
            std::io::BufWriter::new(std::fs::File::create(&archive_path).map_err(internal)?);
        file.write_all(&head).map_err(internal)?;
        let mut size = head.len() as u64;
        drop(head);
        while let Some(chunk) = if ended { None } else { body.next().await } {
            let chunk = chunk.map_err(broke_off)?;
            size += chunk.len() as u64;
            if size > self.limits.max_archive_bytes {
                return Err(UploadError::TooLarge(format!(
                    "the archive is larger than the upload limit of {} bytes (max_upload_bytes)",
                    self.limits.max_archive_bytes
                )));
            }
            file.write_all(&chunk).map_err(internal)?;
        }
        file.flush().map_err(internal)?;
        drop(file);
        // The rest runs to its end even if the client goes away (its threads cannot be
        // cancelled), holding the upload slot and the scratch directory until then.
        let this = self.clone();
        let model = model.to_string();
        tokio::spawn(async move {
            let running = Running::start(&this.uploads);
            let stored = this.store(&model, &scratch, archive_path, admin).await;
            drop((slot, scratch, running));
            stored
        })
        .await
        .map_err(internal)?
    }

    /// Unpacks, checks, loads and installs a spooled archive (upload steps 2 to 4).
    async fn store(
        &self,
        model: &str,
        scratch: &tempfile::TempDir,
        archive_path: PathBuf,
        admin: bool,
    ) -> Result<Stored, UploadError> {
        // 2. Unpack and check, off the async runtime.
        let unpacked = scratch.path().join("bundle");
        std::fs::create_dir(&unpacked).map_err(internal)?;
        let (limits, dir) = (self.limits.clone(), unpacked.clone());
        let checked = lifecycle::in_background(move || check(&archive_path, &dir, &limits))
            .await
            .map_err(internal)??;
        let (bundle, digest, files_size) = checked;
        if bundle.name() != model {
            return Err(UploadError::Invalid(vec![format!(
                "the archive's bundle.toml names '{}' but it was uploaded to /v1/models/{model}/versions",
                bundle.name()
            )]));
        }
        let version = bundle.version();
        let key = (model.to_string(), version);
        if !self.uploads.storing.lock().unwrap().insert(key.clone()) {
            return Err(UploadError::Conflict(format!(
                "version {version} of '{model}' is being uploaded by another request now; \
                 retry once it is done (the same archive is then accepted as stored)"
            )));
        }
        let _storing = Storing {
            uploads: &self.uploads,
            key,
        };
        let stored = Stored {
            name: model.to_string(),
            version,
            digest: digest.clone(),
            created: true,
            state: None,
            note: None,
        };
        if self.is_stored(model, version) {
            return match repository::read_meta(&self.root, model, version) {
                Some(m) if m.digest == digest => Ok(Stored { created: false, ..stored }),
                Some(m) => Err(UploadError::Conflict(format!(
                    "version {version} of '{model}' exists with digest {}; this archive is {digest}: upload it as a new version",
                    m.digest
                ))),
                None => Err(UploadError::Conflict(format!(
                    "version {version} of '{model}' exists (copied in by hand, no recorded digest); upload it as a new version"
                ))),
            };
        }

        // 3. The model must load and warm up before anything is stored. What loads here
        //    is what will serve: the model and assets are in memory, not read from disk.
        let probe = Entry {
            model: model.to_string(),
            version,
            dir: unpacked.clone(),
        };
        let rt = self.runtime.clone();
        let all_metrics = self.registry.metrics().clone();
        let budget = self.registry.budget.clone();
        let loaded = lifecycle::in_background(move || {
            // Only a model gets the version's series (an endpoint has no execution path).
            let metrics = || all_metrics.version(&probe.model, probe.version);
            lifecycle::load_version(&probe, &rt, metrics, Some(&budget))
        })
        .await
        .map_err(internal)?;
        if let Err(e) = &loaded {
            if let Some(full) = e.downcast_ref::<lifecycle::BudgetExceeded>() {
                // Not the bundle's fault: nothing is recorded against the version.
                return Err(UploadError::NoRoom(full.to_string()));
            }
        }
        let loaded = loaded
            .map(Arc::new)
            .map_err(|e| format!("the bundle does not load: {e:#}"));
        let warmed = match (loaded, self.warmup.get()) {
            (Ok(s), Some(hook)) => hook(s.clone()).await.map(|_| s),
            (other, _) => other,
        };
        let servable = match warmed {
            Ok(s) => s,
            Err(msg) => {
                // Visible in the status API, though nothing was stored; logged whole.
                lifecycle::record_failure(&self.registry, model, version, &msg);
                let shown = if admin {
                    msg
                } else {
                    crate::names::public_reason(&msg)
                };
                return Err(UploadError::Invalid(vec![shown]));
            }
        };
        let mut servable = Arc::try_unwrap(servable).map_err(|_| {
            UploadError::Internal("a warm-up request still holds the new version".into())
        })?;

        // 4. Store atomically, then load for serving and retire what falls out of policy.
        let meta = VersionMeta {
            digest,
            size: files_size,
            uploaded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        servable.bundle.dir =
            repository::install(&self.root, model, version, &unpacked, &meta).map_err(internal)?;
        self.registry.publish(Arc::new(servable));
        let policy = self.policies.get(model);
        self.registry.retire_unwanted(model, policy);
        if self.registry.resolve(model, Some(version)).is_ok() {
            tracing::info!(model, version, digest = %stored.digest, "version uploaded and AVAILABLE");
            return Ok(Stored {
                state: Some("AVAILABLE"),
                ..stored
            });
        }
        // Stored, but the policy serves other versions (e.g. `latest 1` and a newer one).
        let note = format!(
            "version {version} is stored but not served: the model's version policy ({}) serves {:?}; \
             give it a label, or change the policy ([policies] or latest_versions in the config)",
            policy.describe(),
            self.registry.available_versions(model)
        );
        tracing::info!(model, version, "version uploaded; {note}");
        Ok(Stored {
            state: Some("END"),
            note: Some(note),
            ..stored
        })
    }
}

impl Manager {
    /// Whether `<repo>/<model>/<version>/` exists (false for a name that is not valid).
    fn is_stored(&self, model: &str, version: u64) -> bool {
        repository::version_dir(&self.root, model, version).is_ok_and(|d| d.is_dir())
    }

    /// Points a label at a version and stores it.
    pub fn set_label(
        &self,
        model: &str,
        label: &str,
        version: u64,
        force: bool,
    ) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        crate::names::check_name("label", label).map_err(UploadError::BadRequest)?;
        crate::names::check_version(version).map_err(UploadError::BadRequest)?;
        if self.registry.status(model).is_none() {
            return Err(UploadError::NotFound(format!(
                "model '{model}' is not found"
            )));
        }
        if force && !self.is_stored(model, version) {
            return Err(UploadError::NotFound(format!(
                "version {version} of '{model}' is not stored"
            )));
        }
        self.registry
            .set_label(model, label, version, force)
            .map_err(UploadError::Conflict)?;
        repository::write_labels(&self.root, model, &self.registry.labels(model)).map_err(internal)
    }

    /// Deletes a stored version: out of service first (requests in flight finish), then
    /// off the disk. A labelled version must lose its labels first.
    pub fn delete(&self, model: &str, version: u64) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        crate::names::check_version(version).map_err(UploadError::BadRequest)?;
        if !self.is_stored(model, version) {
            return Err(UploadError::NotFound(format!(
                "version {version} of '{model}' is not stored"
            )));
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
        self.registry.retire_version(model, version);
        repository::remove(&self.root, model, version).map_err(internal)
    }
}

/// Unpacks and checks an archive; blocking.
fn check(
    archive_path: &std::path::Path,
    dir: &std::path::Path,
    limits: &Limits,
) -> Result<(Bundle, String, u64), UploadError> {
    let file = std::fs::File::open(archive_path).map_err(internal)?;
    let unpacked = archive::unpack(std::io::BufReader::new(file), dir, limits)
        .map_err(UploadError::Invalid)?;
    let bundle = Bundle::open(dir).map_err(|e| UploadError::Invalid(e.reasons))?;
    for (world, h) in bundle.manifest.plugins() {
        let info = crate::plugin::describe(&bundle.file(&h.path))
            .map_err(|e| UploadError::Invalid(vec![format!("{world} {}: {e:#}", h.path)]))?;
        let refused = crate::plugin::refused_imports(&info.imports, world);
        if !refused.is_empty() {
            return Err(UploadError::Invalid(vec![format!(
                "{world} {} imports {}, which nnserve does not grant to a {world}",
                h.path,
                refused.join(", ")
            )]));
        }
    }
    let digest = archive::digest(dir).map_err(internal)?;
    Ok((bundle, digest, unpacked.bytes))
}

/// A version directory's shape: every file with its size and modification time.
type Fingerprint = Vec<(String, u64, Option<std::time::SystemTime>)>;

fn fingerprint(dir: &std::path::Path) -> Option<Fingerprint> {
    let files = archive::list_files(dir).ok()?;
    Some(
        files
            .into_iter()
            .map(|(p, m)| (p, m.len(), m.modified().ok()))
            .collect(),
    )
}

impl Manager {
    /// Watches the repository (TF Serving's file-system source): versions copied in by
    /// hand are loaded once they have not changed for a full `interval` (so a half-copied
    /// directory is never loaded) and the policy wants them; versions whose directory
    /// was removed are taken out of service. Runs until the process ends.
    pub async fn poll(self: Arc<Self>, interval: std::time::Duration) {
        use std::collections::HashMap;
        let mut pending: HashMap<(String, u64), Fingerprint> = HashMap::new();
        let mut failed: HashMap<(String, u64), Fingerprint> = HashMap::new();
        // Versions that start-up already tried and that failed are retried only once
        // their files change.
        if let Ok((entries, _)) = repository::scan(&self.root) {
            for e in entries {
                let ended = self.registry.status(&e.model).is_some_and(|st| {
                    st.iter()
                        .any(|s| s.version == e.version && s.state == lifecycle::State::End)
                });
                if ended {
                    if let Some(fp) = fingerprint(&e.dir) {
                        failed.insert((e.model.clone(), e.version), fp);
                    }
                }
            }
        }
        loop {
            tokio::time::sleep(interval).await;
            let root = self.root.clone();
            let Ok(Ok((entries, _))) =
                tokio::task::spawn_blocking(move || repository::scan(&root)).await
            else {
                continue;
            };
            // Removed by hand: out of service.
            for (model, statuses, _) in self.registry.list() {
                for s in statuses {
                    let gone = !entries
                        .iter()
                        .any(|e| e.model == model && e.version == s.version);
                    if gone && s.state == lifecycle::State::Available {
                        tracing::info!(model = %model, version = s.version, "version directory removed; retiring it");
                        self.registry.retire_version(&model, s.version);
                    }
                }
            }
            // Copied in by hand: load when stable and wanted.
            for entry in &entries {
                if self.unloaded.lock().unwrap().contains(&entry.model) {
                    continue;
                }
                let key = (entry.model.clone(), entry.version);
                let known = self.registry.status(&entry.model).is_some_and(|st| {
                    st.iter()
                        .any(|s| s.version == entry.version && s.state != lifecycle::State::End)
                });
                if known {
                    pending.remove(&key);
                    continue;
                }
                let Some(fp) = fingerprint(&entry.dir) else {
                    continue;
                };
                if failed.get(&key) == Some(&fp) {
                    continue; // failed before and unchanged since
                }
                if pending.get(&key) != Some(&fp) {
                    pending.insert(key, fp); // new or still changing: wait a full interval
                    continue;
                }
                let stored: Vec<u64> = entries
                    .iter()
                    .filter(|e| e.model == entry.model)
                    .map(|e| e.version)
                    .collect();
                let policy = self.policies.get(&entry.model);
                let wanted = policy.wants(entry.version, &stored)
                    // For `latest`, also the newest that is not loaded when newer ones failed.
                    || matches!(policy, lifecycle::VersionPolicy::Latest(_))
                        && self.registry.resolve(&entry.model, None).is_err();
                pending.remove(&key);
                if !wanted || !entry.dir.join("bundle.toml").is_file() {
                    continue;
                }
                tracing::info!(model = %entry.model, version = entry.version, "new version in the repository; loading it");
                match lifecycle::load_and_publish(
                    &self.registry,
                    &self.runtime,
                    entry.clone(),
                    self.warmup.get(),
                )
                .await
                {
                    Ok(_) => self.registry.retire_unwanted(&entry.model, policy),
                    Err(_) => {
                        failed.insert(key, fingerprint(&entry.dir).unwrap_or_default());
                    }
                }
            }
        }
    }
}

impl Manager {
    /// Triton's `load`: the versions the model's policy wants, from the repository.
    pub async fn load_model(&self, model: &str) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        self.unloaded.lock().unwrap().remove(model);
        let root = self.root.clone();
        let (entries, _) = tokio::task::spawn_blocking(move || repository::scan(&root))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let versions: Vec<Entry> = entries.into_iter().filter(|e| e.model == model).collect();
        if versions.is_empty() {
            return Err(UploadError::NotFound(format!(
                "model '{model}' is not in the repository"
            )));
        }
        let policy = self.policies.get(model).clone();
        let labelled: Vec<u64> = self.registry.labels(model).values().copied().collect();
        let outcome = lifecycle::load_wanted(
            &self.registry,
            &self.runtime,
            versions,
            &policy,
            &labelled,
            self.warmup.get(),
        )
        .await;
        self.registry.retire_unwanted(model, &policy);
        if outcome.loaded.is_empty() {
            return Err(UploadError::Invalid(outcome.failed));
        }
        Ok(())
    }

    /// Triton's `unload`: every loaded version out of service (requests in flight finish);
    /// the poller leaves the model alone until it is loaded again.
    pub fn unload_model(&self, model: &str) -> Result<(), UploadError> {
        crate::names::check_name("model name", model).map_err(UploadError::BadRequest)?;
        let Some(statuses) = self.registry.status(model) else {
            return Err(UploadError::NotFound(format!(
                "model '{model}' is not found"
            )));
        };
        self.unloaded.lock().unwrap().insert(model.to_string());
        // A version still loading is marked END too, so that it does not serve when its
        // load finishes.
        for s in statuses.iter().filter(|s| {
            matches!(
                s.state,
                lifecycle::State::Available | lifecycle::State::Loading
            )
        }) {
            self.registry.retire_version(model, s.version);
        }
        Ok(())
    }
}
