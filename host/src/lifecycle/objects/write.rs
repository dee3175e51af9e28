//! Writes through the bucket: an upload's claim, files and record; label changes
//! conditional on the ETag read; deletes.

use super::*;

impl ObjectRepo {
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
}
