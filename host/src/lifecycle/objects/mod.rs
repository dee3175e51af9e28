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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What the bucket holds for one version.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Versions now in the cache, complete and checked, that it did not hold.
    pub installed: Vec<u64>,
    /// Versions whose cached files were replaced by other content (a version deleted and
    /// uploaded again between two polls, a hand copy copied again).
    pub replaced: Vec<u64>,
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
            && self.replaced.is_empty()
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
    /// 503: the store failed before anything changed; the message says which object.
    Store(String),
    /// 503: the store failed half-way through a delete; retrying it completes it.
    Incomplete(String),
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
    /// The labels object's ETag per model and what it held, as last applied.
    labels: HashMap<String, (Option<Option<String>>, LabelsDoc)>,
    /// A cached hand copy's listing when it was downloaded (or first seen after a
    /// restart): a copy changed in the bucket is synced again, as a changed directory
    /// on disk is loaded again.
    hand: HashMap<(String, u64), VersionListing>,
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
        /// Versions a delete has marked (module doc): no label may point at them.
        #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
        deleting: BTreeSet<u64>,
    },
    Plain(BTreeMap<String, u64>),
}

/// A model's labels object as read: the labels, and the versions being deleted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LabelsDoc {
    pub labels: BTreeMap<String, u64>,
    pub deleting: BTreeSet<u64>,
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

/// Makes ring the process's TLS provider (once; a provider already chosen stays): the
/// object store's HTTP client (reqwest, built without a provider of its own) needs one
/// before it is built, for `https://` endpoints; the listener's TLS runs on ring too.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    install_tls_provider();
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
        #[cfg(feature = "gcs")]
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| anyhow::anyhow!("cannot use {url}: {e}"))?,
        ),
        #[cfg(feature = "azure")]
        "az" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .build()
                .map_err(|e| anyhow::anyhow!("cannot use {url}: {e}"))?,
        ),
        #[cfg(not(feature = "gcs"))]
        "gs" => anyhow::bail!(
            "the repository URL {url} needs a build with the `gcs` feature \
             (cargo build --release -p nnserve --features gcs; untested), or use s3://"
        ),
        #[cfg(not(feature = "azure"))]
        "az" => anyhow::bail!(
            "the repository URL {url} needs a build with the `azure` feature \
             (cargo build --release -p nnserve --features azure; untested), or use s3://"
        ),
        other => anyhow::bail!(
            "the repository URL {url} has the scheme '{other}'; nnserve reads s3:// buckets \
             (S3, or any S3 API through AWS_ENDPOINT_URL) and local directories"
        ),
    };
    Ok((store, prefix))
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
                let e = store_err(&format!("cannot reach {}", self.url), e);
                self.health.failed(&e);
                tracing::warn!("{e}");
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
                // Any error, a key object_store cannot read among them (`a//b`, `..`),
                // ends the listing early: a partial listing must never be taken for the
                // bucket (versions missing from it would leave every cache).
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
    /// The object is not there (removed since the listing).
    Missing,
}

mod cache;
mod sync;
mod write;
pub use cache::{default_cache_dir, lock_cache};
pub use sync::Wanted;
pub use write::CLAIM_TIMEOUT_SECS;

#[cfg(test)]
mod test_stores;
#[cfg(test)]
mod tests;
