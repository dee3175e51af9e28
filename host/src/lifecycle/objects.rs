//! The object-store repository (`--repository s3://bucket/prefix`): one bucket shared by
//! identical replicas, each of which syncs what it serves into a local cache directory
//! and loads from there, so that the manager, the loader and every request path see a
//! local repository as before ([`LocalSource`] on the cache).
//!
//! The bucket's layout is the disk's: `<prefix>/<model>/<version>/...` for the files and
//! `<prefix>/<model>/.meta/` for the records, so `aws s3 sync repository s3://b/p` turns
//! a local repository into a bucket one. Beside the disk's records it holds a claim per
//! version being stored (`.meta/<version>.claim`).
//!
//! **Completeness.** An upload claims its version with a conditional put (`If-None-Match:
//! *`; the loser of a race gets 409 and writes nothing), writes the files, and writes the
//! version's record (`.meta/<version>.json`: digest, size, upload time) last. A replica
//! downloads a version with a record into scratch, checks the files against the record's
//! digest, and renames it into the cache: a version is in a cache whole or not at all,
//! and a partial upload (claim, no record) is never loaded. A version copied in by hand
//! (no claim, no record) is downloaded once its listing (names, sizes, ETags) has not
//! changed for a full poll interval, as a hand copy on disk is.
//!
//! **Changes.** Labels live in `.meta/labels.json` with a revision; every change is a
//! read-modify-write conditional on the ETag read (`If-Match`), retried on a conflict, so
//! two replicas changing labels at once both land. A delete first rewrites the labels
//! object (refusing a labelled version), which makes a label change racing it fail its
//! `If-Match` and look again; then it removes the record, the files and the claim.
//!
//! **Polling.** One LIST of the prefix per poll (one request per 1000 objects); a record
//! or the labels are read only when their ETag changed, and nothing is downloaded when
//! nothing changed.

use super::source::LocalSource;
use crate::repository::VersionMeta;
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What the bucket holds for one version.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct VersionListing {
    /// Relative path (`/`-separated) to (size, ETag).
    pub files: BTreeMap<String, (u64, Option<String>)>,
    /// The version's record, with its ETag.
    pub record: Option<Option<String>>,
    pub claim: bool,
}

/// What the bucket holds for one model.
#[derive(Debug, Default, Clone)]
pub struct ModelListing {
    pub versions: BTreeMap<u64, VersionListing>,
    /// The labels object's ETag (`Some(None)`: present, the store gives no ETag).
    pub labels: Option<Option<String>>,
}

/// One model's news from a sync.
#[derive(Debug, Default, PartialEq)]
pub struct ModelSync {
    /// Versions now in the cache, complete and checked (new or replaced).
    pub installed: Vec<u64>,
    /// Versions no longer in the bucket, removed from the cache.
    pub removed: Vec<u64>,
    /// The model's labels, when they changed in the bucket.
    pub labels: Option<BTreeMap<String, u64>>,
    /// Versions refused, with the reason (a digest mismatch, a record that is not one).
    pub refused: Vec<(u64, String)>,
    /// Store or disk failures, tried again next poll.
    pub errors: usize,
}

impl ModelSync {
    /// True when the cache and the labels are as they were.
    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
            && self.removed.is_empty()
            && self.labels.is_none()
            && self.refused.is_empty()
    }
}

/// A write through the bucket that did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// 409: the version is claimed (its record, if it has one), or a labelled version.
    Conflict(String),
    /// The version is stored with this record (an upload's idempotent re-send compares).
    Taken(Option<VersionMeta>),
    /// 500/503: the store failed; the message says which object.
    Store(String),
}

/// The source's health, for status and metrics (`nnserve_repository_sync_errors_total`,
/// `nnserve_repository_last_sync_timestamp_seconds`).
#[derive(Debug, Default)]
pub struct Health {
    /// Seconds since the epoch of the last complete sync; 0: none yet.
    pub last_sync: prometheus_client::metrics::gauge::Gauge,
    pub errors: prometheus_client::metrics::counter::Counter,
    pub last_error: Mutex<Option<String>>,
}

impl Health {
    fn ok(&self) {
        self.last_sync.set(now_secs() as i64);
        *self.last_error.lock().unwrap() = None;
    }
    fn failed(&self, e: &str) {
        self.errors.inc();
        *self.last_error.lock().unwrap() = Some(crate::names::bounded(e));
    }
    /// True when the last sync succeeded.
    pub fn healthy(&self) -> bool {
        self.last_error.lock().unwrap().is_none() && self.last_sync.get() > 0
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a sync remembers between polls (never persisted: a restart reads each record
/// once and compares digests with the cache).
#[derive(Default)]
struct Remembered {
    /// Record ETag and content per version.
    records: HashMap<(String, u64), (Option<String>, VersionMeta)>,
    /// A hand copy's listing seen at the last poll.
    pending: HashMap<(String, u64), VersionListing>,
    /// A refused version's listing: not tried again until it changes.
    refused: HashMap<(String, u64), VersionListing>,
    /// The labels object's ETag per model, as last applied.
    labels: HashMap<String, Option<Option<String>>>,
}

/// `.meta/labels.json` in the bucket: the labels and a revision that every write
/// increments, so that two writes of the same labels still differ (S3's ETag is the
/// content's MD5: without it a delete's rewrite would not change the ETag and a racing
/// label change's `If-Match` would pass). A plain `{label: version}` map, as a local
/// repository holds it (copied in with `aws s3 sync`), is read too.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum LabelsObject {
    Revised {
        labels: BTreeMap<String, u64>,
        revision: u64,
    },
    Plain(BTreeMap<String, u64>),
}

/// The object-store repository and this replica's cache of it.
pub struct ObjectRepo {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// As given (`s3://bucket/prefix`), for messages.
    pub url: String,
    /// The cache: a local repository holding what this replica serves.
    pub cache: LocalSource,
    limits: crate::archive::Limits,
    remembered: Mutex<Remembered>,
    pub health: Health,
    /// The cache directory's lock, held while the process lives.
    _lock: Option<std::fs::File>,
}

/// Whether `repository` names an object store rather than a directory.
pub fn is_url(repository: &str) -> bool {
    repository.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

/// The store and prefix for a repository URL, configured from the environment as the
/// AWS tools are (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...).
pub fn open_store(url: &str) -> anyhow::Result<(Arc<dyn ObjectStore>, Key)> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(
        !bucket.is_empty(),
        "the repository URL {url} names no bucket (write s3://BUCKET/PREFIX)"
    );
    let prefix = Key::parse(prefix.trim_end_matches('/'))
        .map_err(|e| anyhow::anyhow!("the repository URL's prefix is not a valid key: {e}"))?;
    let store: Arc<dyn ObjectStore> = match scheme {
        "s3" => {
            // Fail fast while the bucket is unreachable: the poller retries with its own
            // backoff, and a request must not wait out object_store's default 3 minutes.
            let retry = object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(20),
                backoff: object_store::BackoffConfig {
                    init_backoff: std::time::Duration::from_millis(100),
                    max_backoff: std::time::Duration::from_secs(2),
                    base: 2.0,
                },
            };
            let options = object_store::ClientOptions::new()
                .with_connect_timeout(std::time::Duration::from_secs(5))
                .with_timeout(std::time::Duration::from_secs(300));
            // Our timeouts first, then the environment over them (as `from_env` reads
            // it: `with_client_options` would replace AWS_ALLOW_HTTP and the like).
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_client_options(options)
                .with_retry(retry);
            for (key, value) in std::env::vars() {
                if key.starts_with("AWS_") {
                    if let Ok(k) = key.to_ascii_lowercase().parse() {
                        builder = builder.with_config(k, value);
                    }
                }
            }
            Arc::new(
                builder
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| anyhow::anyhow!("cannot use {url}: {e}"))?,
            )
        }
        other => anyhow::bail!(
            "the repository URL {url} has the scheme '{other}'; nnserve reads s3:// buckets \
             (S3, or any S3 API through AWS_ENDPOINT_URL) and local directories"
        ),
    };
    Ok((store, prefix))
}

/// The default cache directory for a repository URL: under `$XDG_CACHE_HOME` (or
/// `~/.cache`, or the temp directory) a directory per URL, and per process when several
/// replicas share a home: the first slot whose lock is free (`<dir>`, `<dir>.1`, ...).
/// A restart takes its slot back, and with it a valid cache.
pub fn default_cache_dir(url: &str) -> anyhow::Result<(PathBuf, std::fs::File)> {
    use sha2::Digest;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("nnserve");
    let hash = sha2::Sha256::digest(url.as_bytes());
    let readable: String = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    let name = format!(
        "{readable}-{:02x}{:02x}{:02x}{:02x}",
        hash[0], hash[1], hash[2], hash[3]
    );
    for slot in 0..64 {
        let dir = if slot == 0 {
            base.join(&name)
        } else {
            base.join(format!("{name}.{slot}"))
        };
        if let Some(lock) = lock_cache(&dir)? {
            return Ok((dir, lock));
        }
    }
    anyhow::bail!(
        "64 replicas use the caches of {url} under {}; pass --cache-dir",
        base.display()
    )
}

/// Takes the cache directory's lock; `None` when another process holds it.
pub fn lock_cache(dir: &Path) -> anyhow::Result<Option<std::fs::File>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the cache {}: {e}", dir.display()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(|e| anyhow::anyhow!("cannot lock the cache {}: {e}", dir.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock the cache {}: {e}", dir.display())
        }
    }
}

fn store_err(what: &str, e: object_store::Error) -> String {
    format!("{what}: {e}")
}

impl ObjectRepo {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: Key,
        url: String,
        cache: PathBuf,
        lock: Option<std::fs::File>,
        limits: crate::archive::Limits,
    ) -> ObjectRepo {
        ObjectRepo {
            store,
            prefix,
            url,
            cache: LocalSource::new(cache),
            limits,
            remembered: Default::default(),
            health: Default::default(),
            _lock: lock,
        }
    }

    fn key(&self, parts: &[&str]) -> Key {
        let mut key = self.prefix.clone();
        for p in parts {
            key = key.clone().join(*p);
        }
        key
    }

    fn version_key(&self, model: &str, version: u64) -> Key {
        self.key(&[model, &version.to_string()])
    }

    fn record_key(&self, model: &str, version: u64) -> Key {
        self.key(&[model, ".meta", &format!("{version}.json")])
    }

    fn claim_key(&self, model: &str, version: u64) -> Key {
        self.key(&[model, ".meta", &format!("{version}.claim")])
    }

    fn labels_key(&self, model: &str) -> Key {
        self.key(&[model, ".meta", "labels.json"])
    }

    /// Checks that the store takes conditional writes (claims and label changes need
    /// them): a create-only put of a probe object, then its delete. `Ok(false)`: the
    /// store cannot be reached now (the caller goes on with its cache and retries).
    pub async fn check_conditional_writes(&self) -> anyhow::Result<bool> {
        let probe = self.key(&[".nnserve-probe", &format!("{}", std::process::id())]);
        let opts = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(&probe, PutPayload::from_static(b"probe"), opts)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {
                let _ = self.store.delete(&probe).await;
                Ok(true)
            }
            Err(e @ object_store::Error::NotSupported { .. }) => {
                anyhow::bail!("cannot use the object store of {}: {e}", self.url)
            }
            Err(e @ object_store::Error::NotImplemented { .. }) => anyhow::bail!(
                "the object store of {} does not take conditional writes ({e}); nnserve needs them so \
                 that replicas cannot overwrite each other's versions and labels: unset \
                 AWS_CONDITIONAL_PUT or set it to `etag` (S3, MinIO, R2 and moto support If-None-Match and If-Match)",
                self.url
            ),
            Err(e) => {
                tracing::warn!(repository = %self.url, "cannot check the object store now: {e}");
                Ok(false)
            }
        }
    }

    /// One LIST of the whole prefix. Keys that are not a model's version file, record,
    /// claim or labels are skipped (and, when their model name is not valid, logged).
    pub async fn list(&self) -> Result<BTreeMap<String, ModelListing>, String> {
        let mut out: BTreeMap<String, ModelListing> = BTreeMap::new();
        let mut stream = self.store.list(Some(&self.prefix));
        let mut skipped = 0usize;
        while let Some(item) = stream.next().await {
            let meta = match item {
                Ok(m) => m,
                // A key that is not a valid path (e.g. with a `..` segment) is not ours.
                Err(object_store::Error::InvalidPath { .. }) => {
                    skipped += 1;
                    continue;
                }
                Err(e) => {
                    let e = store_err(&format!("cannot list {}", self.url), e);
                    self.health.failed(&e);
                    return Err(e);
                }
            };
            let Some(parts) = meta.location.prefix_match(&self.prefix) else {
                continue;
            };
            let parts: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
            let [model, second, rest @ ..] = parts.as_slice() else {
                continue;
            };
            if !crate::names::valid_name(model) || rest.is_empty() {
                skipped += usize::from(!model.starts_with('.'));
                continue;
            }
            let entry = out.entry(model.clone()).or_default();
            if second == ".meta" {
                let [file] = rest else { continue };
                if file == "labels.json" {
                    entry.labels = Some(meta.e_tag.clone());
                } else if let Some(v) = file.strip_suffix(".json") {
                    if let Ok(v) = crate::names::parse_version(v) {
                        entry.versions.entry(v).or_default().record = Some(meta.e_tag.clone());
                    }
                } else if let Some(v) = file.strip_suffix(".claim") {
                    if let Ok(v) = crate::names::parse_version(v) {
                        entry.versions.entry(v).or_default().claim = true;
                    }
                }
            } else if let Ok(v) = crate::names::parse_version(second) {
                entry
                    .versions
                    .entry(v)
                    .or_default()
                    .files
                    .insert(rest.join("/"), (meta.size, meta.e_tag.clone()));
            } else {
                skipped += 1;
            }
        }
        if skipped > 0 {
            tracing::debug!(repository = %self.url, skipped, "objects that are not a model version's were skipped");
        }
        Ok(out)
    }

    /// Brings the cache of one model to what the bucket holds (module doc). `listing`:
    /// the model's part of this poll's [`ObjectRepo::list`] (`None`: not in the bucket).
    /// Runs under the model's guard (the manager's), so no upload or delete of this
    /// replica interleaves.
    pub async fn sync_model(&self, model: &str, listing: Option<&ModelListing>) -> ModelSync {
        let mut news = ModelSync::default();
        let empty = ModelListing::default();
        let listing = listing.unwrap_or(&empty);
        // Versions gone from the bucket, or being deleted (claim, no record), leave.
        for entry in self.cache.versions(model).into_values() {
            let v = entry.version;
            let gone = match listing.versions.get(&v) {
                None => true,
                Some(l) => l.record.is_none() && (l.claim || l.files.is_empty()),
            };
            if gone && self.cache.remove(model, v).is_ok() {
                tracing::info!(model, version = v, repository = %self.url, "version left the bucket");
                news.removed.push(v);
            }
        }
        for (&v, l) in &listing.versions {
            let key = (model.to_string(), v);
            if self.remembered.lock().unwrap().refused.get(&key) == Some(l) {
                continue; // refused as it is; tried again once it changes
            }
            let result = match &l.record {
                Some(etag) => self.sync_recorded(model, v, etag, l).await,
                None if l.claim => Ok(false), // being stored or deleted by another replica
                None => self.sync_hand_copy(model, v, l).await,
            };
            match result {
                Ok(true) => {
                    self.remembered.lock().unwrap().refused.remove(&key);
                    news.installed.push(v)
                }
                Ok(false) => {}
                Err(Refusal::Bad(reason)) => {
                    tracing::warn!(model, version = v, repository = %self.url, "version refused: {reason}");
                    self.remembered
                        .lock()
                        .unwrap()
                        .refused
                        .insert(key, l.clone());
                    news.refused.push((v, reason));
                }
                Err(Refusal::Store(e)) => {
                    tracing::warn!(model, version = v, "cannot sync the version now: {e}");
                    self.health.failed(&e);
                    news.errors += 1;
                }
            }
        }
        let known = self.remembered.lock().unwrap().labels.get(model).cloned();
        if known != Some(listing.labels.clone()) {
            match self.read_labels(model).await {
                Ok((labels, _)) => {
                    if let Err(e) = self.cache.write_labels(model, &labels) {
                        tracing::warn!(model, "cannot write the labels to the cache: {e}");
                    }
                    self.remembered
                        .lock()
                        .unwrap()
                        .labels
                        .insert(model.to_string(), listing.labels.clone());
                    news.labels = Some(labels);
                }
                Err(e) => {
                    self.health.failed(&e);
                    news.errors += 1;
                }
            }
        }
        news
    }

    /// A version with a record: downloaded when the cache lacks it or holds other
    /// content. True when the cache changed.
    async fn sync_recorded(
        &self,
        model: &str,
        version: u64,
        etag: &Option<String>,
        listing: &VersionListing,
    ) -> Result<bool, Refusal> {
        let key = (model.to_string(), version);
        let known = self.remembered.lock().unwrap().records.get(&key).cloned();
        let record = match known {
            Some((e, meta)) if e == *etag && etag.is_some() => meta,
            _ => {
                let bytes = self
                    .get_bounded(&self.record_key(model, version), 1 << 16)
                    .await?;
                let meta: VersionMeta = serde_json::from_slice(&bytes).map_err(|e| {
                    Refusal::Bad(format!(
                        "its record .meta/{version}.json is not a version record: {e}"
                    ))
                })?;
                self.remembered
                    .lock()
                    .unwrap()
                    .records
                    .insert(key, (etag.clone(), meta.clone()));
                meta
            }
        };
        let cached = self.cache.meta(model, version);
        if self.cache.is_stored(model, version)
            && cached.as_ref().is_some_and(|m| m.digest == record.digest)
        {
            return Ok(false);
        }
        self.download(model, version, listing, Some(record)).await?;
        Ok(true)
    }

    /// A version copied in by hand: downloaded once its listing has not changed for a
    /// poll interval. True when the cache changed.
    async fn sync_hand_copy(
        &self,
        model: &str,
        version: u64,
        listing: &VersionListing,
    ) -> Result<bool, Refusal> {
        if self.cache.is_stored(model, version) {
            return Ok(false);
        }
        let key = (model.to_string(), version);
        let complete = listing.files.contains_key("bundle.toml")
            || listing.files.contains_key("saved_model.pb");
        {
            let mut remembered = self.remembered.lock().unwrap();
            if !complete || remembered.pending.get(&key) != Some(listing) {
                remembered.pending.insert(key, listing.clone());
                return Ok(false); // new or still changing: wait a full interval
            }
            remembered.pending.remove(&key);
        }
        tracing::info!(model, version, repository = %self.url, "new version in the bucket (copied in without a record)");
        self.download(model, version, listing, None).await?;
        Ok(true)
    }

    async fn get_bounded(&self, key: &Key, max: u64) -> Result<bytes::Bytes, Refusal> {
        let got = self
            .store
            .get(key)
            .await
            .map_err(|e| Refusal::Store(store_err(&format!("cannot read {key}"), e)))?;
        if got.meta.size > max {
            return Err(Refusal::Bad(format!(
                "{key} is {} bytes, more than the {max} a record may be",
                got.meta.size
            )));
        }
        got.bytes()
            .await
            .map_err(|e| Refusal::Store(store_err(&format!("cannot read {key}"), e)))
    }

    /// Downloads a version into scratch, checks it (its record's digest, or computes one
    /// for a hand copy), and renames it into the cache.
    async fn download(
        &self,
        model: &str,
        version: u64,
        listing: &VersionListing,
        record: Option<VersionMeta>,
    ) -> Result<(), Refusal> {
        let total: u64 = listing.files.values().map(|(s, _)| s).sum();
        if listing.files.len() > self.limits.max_entries {
            return Err(Refusal::Bad(format!(
                "it has {} files, more than the {} a bundle may have",
                listing.files.len(),
                self.limits.max_entries
            )));
        }
        if total > self.limits.max_total_bytes {
            return Err(Refusal::Bad(format!(
                "its files hold {total} bytes, more than the {} a bundle may hold",
                self.limits.max_total_bytes
            )));
        }
        if let Some((rel, (size, _))) = listing
            .files
            .iter()
            .find(|(_, (s, _))| *s > self.limits.max_file_bytes)
        {
            return Err(Refusal::Bad(format!(
                "{rel} is {size} bytes, more than the {} a bundle's file may be",
                self.limits.max_file_bytes
            )));
        }
        let scratch = self
            .cache
            .scratch()
            .map_err(|e| Refusal::Store(format!("cannot make a scratch directory: {e}")))?;
        let dir = scratch.path().join("version");
        let started = std::time::Instant::now();
        for (rel, (size, _)) in &listing.files {
            let key = self.key(&[model, &version.to_string()]).clone();
            let key = rel.split('/').fold(key, |k, p| k.join(p));
            // Each part came from an object_store path: no `..`, no separators.
            let path = rel.split('/').fold(dir.clone(), |p, part| p.join(part));
            self.fetch_file(&key, &path, *size).await?;
        }
        let (dir2, expected) = (dir.clone(), record.clone());
        let checked = tokio::task::spawn_blocking(move || -> Result<VersionMeta, Refusal> {
            let digest = crate::archive::digest(&dir2)
                .map_err(|e| Refusal::Store(format!("cannot read the download: {e}")))?;
            match expected {
                Some(r) if r.digest != digest => Err(Refusal::Bad(format!(
                    "its files do not match its record: the record says {}, the files are {digest} \
                     (a changed or corrupt object; upload the version again)",
                    r.digest
                ))),
                Some(r) => Ok(r),
                None => Ok(VersionMeta {
                    digest,
                    size: total,
                    uploaded_at: now_secs(),
                }),
            }
        })
        .await
        .map_err(|e| Refusal::Store(e.to_string()))??;
        if self.cache.is_stored(model, version) {
            let _ = self.cache.remove(model, version);
        }
        self.cache
            .install(model, version, &dir, &checked)
            .map_err(|e| Refusal::Store(format!("cannot move the download into the cache: {e}")))?;
        tracing::info!(model, version, bytes = total, took = ?started.elapsed(), digest = %checked.digest, "version synced into the cache");
        Ok(())
    }

    async fn fetch_file(&self, key: &Key, path: &Path, size: u64) -> Result<(), Refusal> {
        use tokio::io::AsyncWriteExt;
        let store =
            |e: object_store::Error| Refusal::Store(store_err(&format!("cannot read {key}"), e));
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| Refusal::Store(format!("cannot write the cache: {e}")))?;
        }
        let got = self.store.get(key).await.map_err(store)?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| Refusal::Store(format!("cannot write the cache: {e}")))?;
        let mut stream = got.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(store)?;
            written += chunk.len() as u64;
            if written > size {
                // Changed since the listing: the digest check would refuse it anyway.
                return Err(Refusal::Store(format!("{key} changed while it was read")));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| Refusal::Store(format!("cannot write the cache: {e}")))?;
        }
        file.flush()
            .await
            .map_err(|e| Refusal::Store(format!("cannot write the cache: {e}")))?;
        Ok(())
    }

    /// A model's labels in the bucket, and the version to make a conditional write on
    /// (`None`: no labels object).
    pub async fn read_labels(
        &self,
        model: &str,
    ) -> Result<(BTreeMap<String, u64>, Option<(UpdateVersion, u64)>), String> {
        let key = self.labels_key(model);
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok((BTreeMap::new(), None)),
            Err(e) => return Err(store_err(&format!("cannot read {key}"), e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        if got.meta.size > 1 << 20 {
            return Err(format!("{key} is over 1 MiB; it cannot be a labels object"));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| store_err(&format!("cannot read {key}"), e))?;
        let (labels, revision) = match serde_json::from_slice(&bytes) {
            Ok(LabelsObject::Revised { labels, revision }) => (labels, revision),
            Ok(LabelsObject::Plain(labels)) => (labels, 0),
            Err(e) => {
                tracing::warn!(
                    model,
                    "the bucket's labels object is not valid ({e}); read as no labels"
                );
                (BTreeMap::new(), 0)
            }
        };
        let labels = labels
            .into_iter()
            .filter(|(l, v)| crate::names::valid_name(l) && crate::names::check_version(*v).is_ok())
            .collect();
        Ok((labels, Some((version, revision))))
    }

    /// Changes a model's labels in the bucket: read, `change`, write conditional on what
    /// was read; on a conflict with another replica's write, read again (8 times at
    /// most). The labels as written.
    pub async fn update_labels(
        &self,
        model: &str,
        change: impl Fn(&mut BTreeMap<String, u64>) -> Result<(), String>,
    ) -> Result<BTreeMap<String, u64>, WriteError> {
        let key = self.labels_key(model);
        for _ in 0..8 {
            let (mut labels, read) = self.read_labels(model).await.map_err(WriteError::Store)?;
            change(&mut labels).map_err(WriteError::Conflict)?;
            let revision = read.as_ref().map_or(0, |(_, r)| r + 1);
            let mode = match read {
                Some((v, _)) => PutMode::Update(v),
                None => PutMode::Create,
            };
            let body = serde_json::to_vec_pretty(&LabelsObject::Revised {
                labels: labels.clone(),
                revision,
            })
            .expect("labels serialize");
            match self.store.put_opts(&key, body.into(), mode.into()).await {
                Ok(_) => {
                    if let Err(e) = self.cache.write_labels(model, &labels) {
                        tracing::warn!(model, "cannot write the labels to the cache: {e}");
                    }
                    return Ok(labels);
                }
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => {
                    return Err(WriteError::Store(store_err(
                        &format!("cannot write {key}"),
                        e,
                    )))
                }
            }
        }
        Err(WriteError::Conflict(format!(
            "the labels of '{model}' kept changing on other replicas; retry"
        )))
    }

    /// Stores a checked version in the bucket: claim, files, record last (module doc).
    pub async fn publish(
        &self,
        model: &str,
        version: u64,
        dir: &Path,
        meta: &VersionMeta,
    ) -> Result<(), WriteError> {
        let claim = self.claim_key(model, version);
        let body = serde_json::json!({
            "digest": meta.digest,
            "claimed_at": now_secs(),
            "by": format!("pid {}", std::process::id()),
        });
        match self
            .store
            .put_opts(
                &claim,
                serde_json::to_vec(&body).expect("json").into(),
                PutMode::Create.into(),
            )
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                let record = self
                    .get_bounded(&self.record_key(model, version), 1 << 16)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                return Err(WriteError::Taken(record));
            }
            Err(e) => {
                return Err(WriteError::Store(store_err(
                    &format!("cannot claim {claim}"),
                    e,
                )))
            }
        }
        let written = self.write_files(model, version, dir, meta).await;
        if let Err(e) = written {
            // Leave nothing half-written: the files, then the claim.
            self.delete_objects(model, version).await.ok();
            return Err(WriteError::Store(e));
        }
        Ok(())
    }

    async fn write_files(
        &self,
        model: &str,
        version: u64,
        dir: &Path,
        meta: &VersionMeta,
    ) -> Result<(), String> {
        let d = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || crate::archive::list_files(&d))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot list the bundle: {e}"))?;
        for (rel, _) in files {
            let key = rel
                .split('/')
                .fold(self.version_key(model, version), |k, p| k.join(p));
            let mut file = tokio::fs::File::open(dir.join(&rel))
                .await
                .map_err(|e| format!("cannot read {rel}: {e}"))?;
            // Multipart above 10 MB, one PUT below (object_store's BufWriter decides).
            let mut out = object_store::buffered::BufWriter::new(self.store.clone(), key.clone());
            let copied = tokio::io::copy(&mut file, &mut out).await;
            let closed = match copied {
                Ok(_) => tokio::io::AsyncWriteExt::shutdown(&mut out).await,
                Err(e) => {
                    let _ = out.abort().await;
                    Err(e)
                }
            };
            closed.map_err(|e| format!("cannot write {key}: {e}"))?;
        }
        let record = self.record_key(model, version);
        self.store
            .put(
                &record,
                serde_json::to_vec_pretty(meta).expect("json").into(),
            )
            .await
            .map_err(|e| store_err(&format!("cannot write {record}"), e))?;
        Ok(())
    }

    /// Removes a version from the bucket: refused while a label points at it (checked
    /// by a conditional rewrite of the labels, so that a label set on it meanwhile by
    /// another replica fails and looks again), then the record (replicas stop loading
    /// it), the files, and the claim.
    pub async fn delete_version(&self, model: &str, version: u64) -> Result<(), WriteError> {
        self.update_labels(model, |labels| {
            match labels.iter().find(|(_, &v)| v == version) {
                Some((label, _)) => Err(format!(
                "version {version} of '{model}' carries the label '{label}'; move the label first"
            )),
                None => Ok(()),
            }
        })
        .await?;
        let record = self.record_key(model, version);
        match self.store.delete(&record).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(WriteError::Store(store_err(
                    &format!("cannot delete {record}"),
                    e,
                )))
            }
        }
        self.delete_objects(model, version)
            .await
            .map_err(WriteError::Store)
    }

    /// The version's files, then its claim.
    async fn delete_objects(&self, model: &str, version: u64) -> Result<(), String> {
        let prefix = self.version_key(model, version);
        let keys: Vec<Key> = self
            .store
            .list(Some(&prefix))
            .filter_map(|m| async move { m.ok().map(|m| m.location) })
            .collect()
            .await;
        for key in keys {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(&format!("cannot delete {key}"), e)),
            }
        }
        let claim = self.claim_key(model, version);
        match self.store.delete(&claim).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(&format!("cannot delete {claim}"), e)),
        }
    }

    /// Whether the bucket holds the version (a record, files or a claim); `None` when
    /// the bucket cannot be asked now.
    pub async fn is_stored(&self, model: &str, version: u64) -> Option<bool> {
        for key in [
            self.record_key(model, version),
            self.claim_key(model, version),
        ] {
            match self.store.head(&key).await {
                Ok(_) => return Some(true),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(_) => return None,
            }
        }
        let prefix = self.version_key(model, version);
        match self.store.list(Some(&prefix)).next().await {
            Some(Ok(_)) => Some(true),
            Some(Err(_)) => None,
            None => Some(false),
        }
    }

    /// Checks every cached version against its record's digest and drops what does not
    /// match (a cache written by a process that died mid-way, or changed by hand), so a
    /// restart serves only valid cached versions. Blocking. The versions kept.
    pub fn check_cache(&self) -> usize {
        let Ok((entries, _)) = self.cache.scan() else {
            return 0;
        };
        let mut kept = 0;
        for e in entries {
            let ok = self
                .cache
                .meta(&e.model, e.version)
                .is_some_and(|m| crate::archive::digest(&e.dir).is_ok_and(|d| d == m.digest));
            if ok {
                kept += 1;
            } else {
                tracing::warn!(model = %e.model, version = e.version, cache = %self.cache.root.display(),
                    "a cached version does not match its record; removed (it is downloaded again)");
                let _ = self.cache.remove(&e.model, e.version);
            }
        }
        kept
    }

    /// A whole sync (start-up, or a test): every model in the bucket or the cache.
    pub async fn sync_all(&self) -> Result<BTreeMap<String, ModelSync>, String> {
        let listing = self.list().await?;
        let mut models: std::collections::BTreeSet<String> = listing.keys().cloned().collect();
        if let Ok((entries, _)) = self.cache.scan() {
            models.extend(entries.into_iter().map(|e| e.model));
        }
        let mut out = BTreeMap::new();
        let mut errors = 0;
        for model in models {
            let news = self.sync_model(&model, listing.get(&model)).await;
            errors += news.errors;
            out.insert(model, news);
        }
        if errors == 0 {
            self.synced();
        }
        Ok(out)
    }

    /// Marks a poll's sync complete (health and metrics).
    pub fn synced(&self) {
        self.health.ok();
    }
}

/// Why a version was not synced.
#[derive(Debug)]
enum Refusal {
    /// The version's content is wrong: refused until it changes.
    Bad(String),
    /// The store or the disk failed: tried again next poll.
    Store(String),
}

#[cfg(test)]
#[path = "objects_tests.rs"]
mod tests;
