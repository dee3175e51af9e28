//! Receiving a bundle: the archive is streamed to a file in the repository's scratch
//! area, unpacked with the archive rules, checked (manifest, paths, plugin imports, the
//! model loads and warms up), and handed to [`Manager::install`], which moves it into
//! `<repo>/<model>/<version>/` in one step and reconciles the model.
//!
//! This module knows files and archives; the model's life is the manager's. `api` maps
//! [`UploadError`] to statuses.

use super::loader::{in_background, LoadError};
use super::manager::Manager;
use crate::archive::{self, Limits};
use crate::bundle::Bundle;
use crate::repository::{Entry, VersionMeta};
use futures::{Stream, StreamExt};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// 503: the object store failed; nothing was changed.
    Unavailable(String),
}

/// A stored version.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
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
    #[schema(value_type = Option<String>, required = false)]
    pub state: Option<&'static str>,
    /// Why a stored version does not serve, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
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
        let scratch = self.source.scratch().map_err(internal)?;
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
        let checked = in_background(move || check(&archive_path, &dir, &limits))
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
        if self.source.is_stored(model, version) {
            return self.already_stored(model, version, stored);
        }

        // 3. The model must load and warm up before anything is stored. What loads here
        //    is what will serve: the model and assets are in memory, not read from disk.
        let probe = Entry {
            model: model.to_string(),
            version,
            dir: unpacked.clone(),
        };
        let servable = match self.loader.load(probe).await {
            Ok(s) => s,
            // Not the bundle's fault: nothing is recorded against the version.
            Err(LoadError::NoRoom(m)) => return Err(UploadError::NoRoom(m)),
            Err(e) => {
                let msg = match e {
                    LoadError::Failed(m) => format!("the bundle does not load: {m}"),
                    other => other.to_string(),
                };
                // Visible in the status API, though nothing was stored; logged whole.
                tracing::warn!(model, version, "upload refused: {msg}");
                self.registry.fail(model, version, msg.clone(), false);
                let shown = if admin {
                    msg
                } else {
                    crate::names::public_reason(&msg)
                };
                return Err(UploadError::Invalid(vec![shown]));
            }
        };

        // 4. Store atomically; the manager serves it if the policy wants it.
        let meta = VersionMeta {
            digest,
            size: files_size,
            uploaded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        self.install(model, &unpacked, meta, servable).await
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
