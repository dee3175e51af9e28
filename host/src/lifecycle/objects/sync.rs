//! Bucket to cache: one model's sync (records, hand copies, removals, labels), the
//! download into scratch with its digest check, and the start-up check of a cache.

use super::*;

impl ObjectRepo {
    /// Brings the cache of one model to what the bucket holds (module doc). `listing`:
    /// the model's part of this poll's [`ObjectRepo::list`] (`None`: not in the bucket).
    /// Runs under the model's guard (the manager's), so no upload or delete of this
    /// replica interleaves. `at_start`: the start-up sync, which takes hand copies at
    /// once, as a local repository's start-up load takes every directory present.
    pub async fn sync_model(
        &self,
        model: &str,
        listing: Option<&ModelListing>,
        at_start: bool,
    ) -> ModelSync {
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
                None => self.sync_hand_copy(model, v, l, at_start).await,
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
    /// poll interval (at start-up: at once). True when the cache changed.
    async fn sync_hand_copy(
        &self,
        model: &str,
        version: u64,
        listing: &VersionListing,
        at_start: bool,
    ) -> Result<bool, Refusal> {
        let key = (model.to_string(), version);
        let cached = self.cache.is_stored(model, version);
        let complete = listing.files.contains_key("bundle.toml")
            || listing.files.contains_key("saved_model.pb");
        {
            let mut remembered = self.remembered.lock().unwrap();
            if cached {
                // Unchanged since it was cached (after a restart: taken as it is).
                let synced = remembered
                    .hand
                    .entry(key.clone())
                    .or_insert_with(|| listing.clone());
                if synced == listing {
                    return Ok(false);
                }
            }
            if !complete || !(at_start || remembered.pending.get(&key) == Some(listing)) {
                remembered.pending.insert(key, listing.clone());
                return Ok(false); // new or still changing: wait a full interval
            }
            remembered.pending.remove(&key);
        }
        tracing::info!(model, version, repository = %self.url, replaces = cached,
            "new version in the bucket (copied in without a record)");
        self.download(model, version, listing, None).await?;
        self.remembered
            .lock()
            .unwrap()
            .hand
            .insert(key, listing.clone());
        Ok(true)
    }

    pub(super) async fn get_bounded(&self, key: &Key, max: u64) -> Result<bytes::Bytes, Refusal> {
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
    pub async fn sync_all(&self, at_start: bool) -> Result<BTreeMap<String, ModelSync>, String> {
        let listing = self.list().await?;
        let mut models: std::collections::BTreeSet<String> = listing.keys().cloned().collect();
        if let Ok((entries, _)) = self.cache.scan() {
            models.extend(entries.into_iter().map(|e| e.model));
        }
        let mut out = BTreeMap::new();
        let mut errors = 0;
        for model in models {
            let news = self.sync_model(&model, listing.get(&model), at_start).await;
            errors += news.errors;
            out.insert(model, news);
        }
        if errors == 0 {
            self.synced();
        }
        Ok(out)
    }
}
