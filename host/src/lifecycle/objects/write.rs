//! Writes through the bucket: an upload's claim, files and record; label changes
//! conditional on the ETag read; deletes.

use super::*;

/// How long a claim without a record counts as an upload under way: a delete of the
/// version is refused before, and clears the claim after (an interrupted upload's).
pub const CLAIM_TIMEOUT_SECS: u64 = 600;

/// A claim's content: who claimed the version, when, for which content.
#[derive(serde::Serialize, serde::Deserialize)]
struct Claim {
    digest: String,
    claimed_at: u64,
    /// Random per upload: the uploader checks it is still its claim before it writes the
    /// record (a delete may have cleared it meanwhile).
    token: String,
}

fn token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // RandomState is seeded from the OS per process; the counter and the clock make
    // each upload's token differ within it.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

impl ObjectRepo {
    /// A model's labels in the bucket, and the version to make a conditional write on
    /// (`None`: no labels object). A labels object that is not one is an error (the
    /// labels stay as they were on every replica, and changes are refused until it is
    /// fixed), never read as "no labels".
    pub async fn read_labels(
        &self,
        model: &str,
    ) -> Result<(LabelsDoc, Option<(UpdateVersion, u64)>), String> {
        let key = self.labels_key(model);
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok((LabelsDoc::default(), None)),
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
        let (labels, revision, deleting) = match serde_json::from_slice(&bytes) {
            Ok(LabelsObject::Revised {
                labels,
                revision,
                deleting,
            }) => (labels, revision, deleting),
            Ok(LabelsObject::Plain(labels)) => (labels, 0, Default::default()),
            Err(e) => {
                return Err(format!(
                    "{key} is not a labels object ({e}): fix it (a JSON map of label to version) or delete it"
                ))
            }
        };
        let labels = labels
            .into_iter()
            .filter(|(l, v)| crate::names::valid_name(l) && crate::names::check_version(*v).is_ok())
            .collect();
        Ok((LabelsDoc { labels, deleting }, Some((version, revision))))
    }

    /// Changes a model's labels in the bucket: read, `change`, write conditional on what
    /// was read; on a conflict with another replica's write, read again and apply
    /// `change` again (8 times at most). The labels as written.
    pub async fn update_labels(
        &self,
        model: &str,
        change: impl Fn(&mut LabelsDoc) -> Result<(), String>,
    ) -> Result<LabelsDoc, WriteError> {
        let key = self.labels_key(model);
        for _ in 0..8 {
            let (mut doc, read) = self.read_labels(model).await.map_err(WriteError::Store)?;
            change(&mut doc).map_err(WriteError::Conflict)?;
            let revision = read.as_ref().map_or(0, |(_, r)| r + 1);
            let mode = match read {
                Some((v, _)) => PutMode::Update(v),
                None => PutMode::Create,
            };
            let body = serde_json::to_vec_pretty(&LabelsObject::Revised {
                labels: doc.labels.clone(),
                revision,
                deleting: doc.deleting.clone(),
            })
            .expect("labels serialize");
            match self.store.put_opts(&key, body.into(), mode.into()).await {
                Ok(_) => {
                    if let Err(e) = self.cache.write_labels(model, &doc.labels) {
                        tracing::warn!(model, "cannot write the labels to the cache: {e}");
                    }
                    return Ok(doc);
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

    /// Points `label` at `version` in the bucket, unless the version is being deleted
    /// (a delete marks it in the labels object first, so either the delete sees the
    /// label and refuses, or this sees the mark and refuses). The labels as written.
    ///
    /// Then it checks that the version is still in the bucket: a delete that began and
    /// ended between the caller's own check and this write left it gone, and the label
    /// is taken back (409).
    pub async fn set_label(
        &self,
        model: &str,
        label: &str,
        version: u64,
    ) -> Result<BTreeMap<String, u64>, WriteError> {
        let before = std::sync::Mutex::new(None);
        let doc = self
            .update_labels(model, |doc| {
                if doc.deleting.contains(&version) {
                    return Err(format!(
                        "version {version} of '{model}' is being deleted through another replica"
                    ));
                }
                *before.lock().unwrap() = doc.labels.insert(label.to_string(), version);
                Ok(())
            })
            .await?;
        match self.is_stored(model, version).await {
            Some(true) => Ok(doc.labels),
            stored => {
                let before = *before.lock().unwrap();
                let undone = self
                    .update_labels(model, |doc| {
                        if doc.labels.get(label) == Some(&version) {
                            match before {
                                Some(v) => doc.labels.insert(label.to_string(), v),
                                None => doc.labels.remove(label),
                            };
                        }
                        Ok(())
                    })
                    .await;
                match (stored, undone) {
                    (Some(false), Ok(_)) => Err(WriteError::Conflict(format!(
                        "version {version} of '{model}' was deleted through another replica meanwhile"
                    ))),
                    _ => Err(WriteError::Store(format!(
                        "cannot check that version {version} of '{model}' is still stored; retry"
                    ))),
                }
            }
        }
    }

    /// Stores a checked version in the bucket: claim, files, record last (module doc).
    pub async fn publish(
        &self,
        model: &str,
        version: u64,
        dir: &Path,
        meta: &VersionMeta,
    ) -> Result<(), WriteError> {
        let claim_key = self.claim_key(model, version);
        let claim = Claim {
            digest: meta.digest.clone(),
            claimed_at: now_secs(),
            token: token(),
        };
        let body = serde_json::to_vec(&claim).expect("json");
        match self
            .store
            .put_opts(&claim_key, body.into(), PutMode::Create.into())
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
                    &format!("cannot claim {claim_key}"),
                    e,
                )))
            }
        }
        // Files under the version that no upload wrote (a copy by hand not synced here
        // yet) would mix with ours: refuse, and give the claim back.
        let prefix = self.version_key(model, version);
        match self.store.list(Some(&prefix)).next().await {
            None => {}
            Some(found) => {
                let _ = self.store.delete(&claim_key).await;
                return Err(match found {
                    Ok(_) => WriteError::Conflict(format!(
                        "the bucket holds files under version {version} of '{model}' that no upload \
                         recorded (a copy by hand?); delete them or upload as a new version"
                    )),
                    Err(e) => WriteError::Store(store_err(&format!("cannot list {prefix}"), e)),
                });
            }
        }
        let written = self.write_files(model, version, dir, &claim, meta).await;
        if let Err(e) = written {
            // Leave nothing half-written: the record (if its PUT landed), the files, and
            // the claim if it is still ours.
            let _ = self.store.delete(&self.record_key(model, version)).await;
            let _ = self.delete_files(model, version).await;
            if matches!(e, WriteError::Store(_)) {
                let _ = self.store.delete(&claim_key).await;
            }
            return Err(e);
        }
        Ok(())
    }

    async fn write_files(
        &self,
        model: &str,
        version: u64,
        dir: &Path,
        claim: &Claim,
        meta: &VersionMeta,
    ) -> Result<(), WriteError> {
        let d = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || crate::archive::list_files(&d))
            .await
            .map_err(|e| WriteError::Store(e.to_string()))?
            .map_err(|e| WriteError::Store(format!("cannot list the bundle: {e}")))?;
        for (rel, _) in files {
            let key = rel
                .split('/')
                .fold(self.version_key(model, version), |k, p| k.join(p));
            let mut file = tokio::fs::File::open(dir.join(&rel))
                .await
                .map_err(|e| WriteError::Store(format!("cannot read {rel}: {e}")))?;
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
            closed.map_err(|e| WriteError::Store(format!("cannot write {key}: {e}")))?;
        }
        // Still our claim? A delete of the version may have cleared it meanwhile.
        let claim_key = self.claim_key(model, version);
        let ours = match self.get_small(&claim_key).await {
            Ok(Some(b)) => {
                serde_json::from_slice::<Claim>(&b).is_ok_and(|c| c.token == claim.token)
            }
            Ok(None) => false,
            Err(e) => return Err(WriteError::Store(e)),
        };
        if !ours {
            return Err(WriteError::Conflict(format!(
                "version {version} of '{model}' was deleted while it was being uploaded; nothing was stored"
            )));
        }
        let record = self.record_key(model, version);
        self.store
            .put(
                &record,
                serde_json::to_vec_pretty(meta).expect("json").into(),
            )
            .await
            .map_err(|e| WriteError::Store(store_err(&format!("cannot write {record}"), e)))?;
        Ok(())
    }

    /// Removes a version from the bucket:
    /// 1. marks it as being deleted in the labels object, refused while a label points
    ///    at it (a label change racing this fails its `If-Match`, reads the mark, and
    ///    refuses);
    /// 2. removes the record (replicas stop loading it), the files and the claim;
    /// 3. clears the mark.
    ///
    /// A version with a claim and no record younger than [`CLAIM_TIMEOUT_SECS`] is an
    /// upload under way: refused.
    pub async fn delete_version(&self, model: &str, version: u64) -> Result<(), WriteError> {
        let record = self.record_key(model, version);
        if matches!(
            self.store.head(&record).await,
            Err(object_store::Error::NotFound { .. })
        ) {
            if let Ok(Some(bytes)) = self.get_small(&self.claim_key(model, version)).await {
                let age = serde_json::from_slice::<Claim>(&bytes)
                    .map_or(u64::MAX, |c| now_secs().saturating_sub(c.claimed_at));
                if age < CLAIM_TIMEOUT_SECS {
                    return Err(WriteError::Conflict(format!(
                        "version {version} of '{model}' is being uploaded through a replica (claimed {age} s ago); \
                         an interrupted upload's claim can be deleted {CLAIM_TIMEOUT_SECS} s after it was made"
                    )));
                }
            }
        }
        self.update_labels(model, |doc| {
            if let Some((label, _)) = doc.labels.iter().find(|(_, &v)| v == version) {
                return Err(format!(
                    "version {version} of '{model}' carries the label '{label}'; move the label first"
                ));
            }
            doc.deleting.insert(version);
            Ok(())
        })
        .await?;
        let half = |e: String| {
            WriteError::Incomplete(format!(
                "version {version} of '{model}' is half deleted ({e}); retry the delete"
            ))
        };
        match self.store.delete(&record).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(half(store_err(&format!("cannot delete {record}"), e))),
        }
        self.delete_files(model, version).await.map_err(half)?;
        let claim = self.claim_key(model, version);
        match self.store.delete(&claim).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(half(store_err(&format!("cannot delete {claim}"), e))),
        }
        self.update_labels(model, |doc| {
            doc.deleting.remove(&version);
            Ok(())
        })
        .await
        .map_err(|e| match e {
            WriteError::Store(m) | WriteError::Conflict(m) | WriteError::Incomplete(m) => half(m),
            WriteError::Taken(_) => half("taken".into()),
        })?;
        Ok(())
    }

    /// Every object under the version's directory; an error when they cannot all be
    /// listed or removed (never a partial removal reported as done).
    async fn delete_files(&self, model: &str, version: u64) -> Result<(), String> {
        let prefix = self.version_key(model, version);
        let listed: Vec<object_store::Result<object_store::ObjectMeta>> =
            self.store.list(Some(&prefix)).collect().await;
        for item in listed {
            let key = item
                .map_err(|e| store_err(&format!("cannot list {prefix}"), e))?
                .location;
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(&format!("cannot delete {key}"), e)),
            }
        }
        Ok(())
    }

    /// A small object (a claim or a record: 64 KiB at most), `None` when there is none.
    async fn get_small(&self, key: &Key) -> Result<Option<bytes::Bytes>, String> {
        match self.get_bounded(key, 1 << 16).await {
            Ok(b) => Ok(Some(b)),
            Err(Refusal::Missing) => Ok(None),
            Err(Refusal::Store(e)) | Err(Refusal::Bad(e)) => Err(e),
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
}
