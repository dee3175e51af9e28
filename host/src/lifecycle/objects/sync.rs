//! Bucket to cache: one model's sync (records, hand copies, removals, labels), the
//! download into scratch with its digest check, and the start-up check of a cache.

use super::*;

/// Which of a model's complete versions in the bucket this replica should hold, given
/// the bucket's labels: the manager's version policy over them (see
/// `Manager::wanted`); the rest is not downloaded.
pub type Wanted<'a> = &'a (dyn Fn(&BTreeSet<u64>, &BTreeMap<String, u64>) -> BTreeSet<u64> + Sync);

/// Downloads this large log their progress.
const PROGRESS_FROM: u64 = 64 << 20;

/// A download's progress, logged every 2 s for a large version.
struct Progress<'a> {
    model: &'a str,
    version: u64,
    done: u64,
    total: u64,
    logged: std::time::Instant,
}

impl Progress<'_> {
    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        if self.total >= PROGRESS_FROM && self.logged.elapsed() >= std::time::Duration::from_secs(2)
        {
            self.logged = std::time::Instant::now();
            tracing::info!(
                model = self.model,
                version = self.version,
                "downloading: {} of {} MB",
                self.done >> 20,
                self.total >> 20
            );
        }
    }
}

/// A hand copy's state in this poll.
enum Hand {
    /// Still changing (or without a manifest): wait.
    Waiting,
    /// In the cache as it is in the bucket.
    Cached,
    /// Unchanged for a poll interval (or at start-up), and not in the cache as it is.
    Ready,
}

impl ObjectRepo {
    /// Brings the cache of one model to what the bucket holds and the policy wants
    /// (module doc). `listing`: the model's part of this poll's [`ObjectRepo::list`]
    /// (`None`: not in the bucket). Runs under the model's guard (the manager's), so no
    /// upload or delete of this replica interleaves. `at_start`: the start-up sync,
    /// which takes hand copies at once, as a local repository's start-up load takes
    /// every directory present.
    pub async fn sync_model(
        &self,
        model: &str,
        listing: Option<&ModelListing>,
        at_start: bool,
        wanted: Wanted<'_>,
    ) -> ModelSync {
        let mut news = ModelSync::default();
        let empty = ModelListing::default();
        let listing = listing.unwrap_or(&empty);
        // 1. The labels first: they say which versions are being deleted, and which the
        //    policy keeps. Read only when their ETag changed; kept as they were when
        //    they cannot be read.
        let known = self.remembered.lock().unwrap().labels.get(model).cloned();
        let doc = match known {
            Some((etag, doc)) if etag == listing.labels => doc,
            known => match self.read_labels(model).await {
                Ok((doc, _)) => {
                    if let Err(e) = self.cache.write_labels(model, &doc.labels) {
                        tracing::warn!(model, "cannot write the labels to the cache: {e}");
                    }
                    if known.as_ref().map(|(_, d)| &d.labels) != Some(&doc.labels) {
                        news.labels = Some(doc.labels.clone());
                    }
                    self.remembered
                        .lock()
                        .unwrap()
                        .labels
                        .insert(model.to_string(), (listing.labels.clone(), doc.clone()));
                    doc
                }
                Err(e) => {
                    tracing::warn!(model, "cannot read the labels: {e}");
                    self.health.failed(&e);
                    news.errors += 1;
                    known.map(|(_, d)| d).unwrap_or_default()
                }
            },
        };
        // 2. Versions gone from the bucket, or being deleted, leave the cache.
        for entry in self.cache.versions(model).into_values() {
            let v = entry.version;
            let gone = doc.deleting.contains(&v)
                || match listing.versions.get(&v) {
                    None => true,
                    Some(l) => l.record.is_none() && (l.claim || l.files.is_empty()),
                };
            if gone && self.cache.remove(model, v).is_ok() {
                self.forget_hand_listing(model, v);
                tracing::info!(model, version = v, repository = %self.url, "version left the bucket");
                news.removed.push(v);
            }
        }
        // 3. The versions complete in the bucket, and those the policy wants of them.
        let mut complete = BTreeSet::new();
        let mut ready = BTreeSet::new();
        for (&v, l) in &listing.versions {
            let key = (model.to_string(), v);
            if doc.deleting.contains(&v)
                || self.remembered.lock().unwrap().refused.get(&key) == Some(l)
            {
                continue; // refused as it is: tried again once it changes
            }
            match (&l.record, l.claim) {
                (Some(_), _) => {
                    complete.insert(v);
                }
                (None, true) => {} // being stored or deleted through another replica
                (None, false) => match self.hand_state(model, v, l, at_start) {
                    Hand::Waiting => {}
                    Hand::Cached => {
                        complete.insert(v);
                    }
                    Hand::Ready => {
                        complete.insert(v);
                        ready.insert(v);
                    }
                },
            }
        }
        let want = wanted(&complete, &doc.labels);
        // 4. Fetch what is wanted, and what the cache holds, where the cache does not
        //    hold it as the bucket does (a cached version always follows the bucket, also
        //    one that failed to load: its new content may load).
        for &v in &complete {
            if !want.contains(&v) && !self.cache.is_stored(model, v) {
                continue;
            }
            let l = &listing.versions[&v];
            let key = (model.to_string(), v);
            let replaces = self.cache.is_stored(model, v);
            let result = match &l.record {
                Some(etag) => self.sync_recorded(model, v, etag, l).await,
                None if ready.contains(&v) => self.sync_hand_copy(model, v, l).await,
                None => Ok(false),
            };
            match result {
                Ok(true) => {
                    self.remembered.lock().unwrap().refused.remove(&key);
                    if replaces {
                        news.replaced.push(v);
                    } else {
                        news.installed.push(v);
                    }
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
                Err(Refusal::Missing) => {
                    news.errors += 1; // removed since the listing: the next poll sees it
                }
            }
        }
        // What is no longer listed is forgotten (so the maps stay as small as the bucket).
        let mut remembered = self.remembered.lock().unwrap();
        let listed = |k: &(String, u64)| k.0 != model || listing.versions.contains_key(&k.1);
        remembered.records.retain(|k, _| listed(k));
        remembered.pending.retain(|k, _| listed(k));
        remembered.refused.retain(|k, _| listed(k));
        remembered.hand.retain(|k, _| listed(k));
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
                    Refusal::Bad(format!("its record is not a version record: {e}"))
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

    /// Where a hand copy stands: synced once its listing has not changed for a poll
    /// interval (at start-up: at once), and again when it changes and settles. The
    /// listing it was synced from is kept beside the cache, so that a copy changed while
    /// the replica was down is synced again after a restart.
    fn hand_state(
        &self,
        model: &str,
        version: u64,
        listing: &VersionListing,
        at_start: bool,
    ) -> Hand {
        let key = (model.to_string(), version);
        let cached = self.cache.is_stored(model, version);
        let manifest = listing.files.contains_key("bundle.toml")
            || listing.files.contains_key("saved_model.pb");
        let mut remembered = self.remembered.lock().unwrap();
        if cached {
            let synced = match remembered.hand.get(&key) {
                Some(l) => Some(l.clone()),
                None => self.read_hand_listing(model, version),
            };
            match synced {
                Some(l) if l == *listing => {
                    remembered.hand.insert(key, l);
                    return Hand::Cached;
                }
                // Cached before listings were kept: taken as it is.
                None => {
                    remembered.hand.insert(key, listing.clone());
                    return Hand::Cached;
                }
                Some(_) => {} // changed in the bucket: settles, then replaces the cache
            }
        }
        if manifest && (at_start || remembered.pending.get(&key) == Some(listing)) {
            remembered.pending.remove(&key);
            return Hand::Ready;
        }
        remembered.pending.insert(key, listing.clone());
        if cached {
            Hand::Cached // the cached copy serves until the new one has settled
        } else {
            Hand::Waiting
        }
    }

    fn hand_listing_path(&self, model: &str, version: u64) -> Option<PathBuf> {
        let dir = crate::repository::model_dir(&self.cache.root, model).ok()?;
        Some(dir.join(".meta").join(format!("{version}.listing.json")))
    }

    fn read_hand_listing(&self, model: &str, version: u64) -> Option<VersionListing> {
        let bytes = std::fs::read(self.hand_listing_path(model, version)?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn forget_hand_listing(&self, model: &str, version: u64) {
        if let Some(p) = self.hand_listing_path(model, version) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// A version copied in by hand, settled: downloaded, its digest computed, moved into
    /// the cache with the listing it came from. True when the cache changed.
    async fn sync_hand_copy(
        &self,
        model: &str,
        version: u64,
        listing: &VersionListing,
    ) -> Result<bool, Refusal> {
        let replaces = self.cache.is_stored(model, version);
        tracing::info!(model, version, repository = %self.url, replaces,
            "new version in the bucket (copied in without a record)");
        self.download(model, version, listing, None).await?;
        if let Some(p) = self.hand_listing_path(model, version) {
            let written = serde_json::to_vec(listing)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&p, b));
            if let Err(e) = written {
                tracing::warn!(
                    model,
                    version,
                    "cannot keep the copy's listing in the cache: {e}"
                );
            }
        }
        self.remembered
            .lock()
            .unwrap()
            .hand
            .insert((model.to_string(), version), listing.clone());
        Ok(true)
    }

    pub(super) async fn get_bounded(&self, key: &Key, max: u64) -> Result<bytes::Bytes, Refusal> {
        let got = match self.store.get(key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(Refusal::Missing),
            Err(e) => return Err(Refusal::Store(store_err(&format!("cannot read {key}"), e))),
        };
        if got.meta.size > max {
            return Err(Refusal::Bad(format!(
                "its record is {} bytes, more than the {max} a record may be",
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
        let mut progress = Progress {
            model,
            version,
            done: 0,
            total,
            logged: started,
        };
        if total >= PROGRESS_FROM {
            tracing::info!(
                model,
                version,
                mb = total >> 20,
                files = listing.files.len(),
                "downloading"
            );
        }
        for (rel, (size, _)) in &listing.files {
            let key = self.key(&[model, &version.to_string()]).clone();
            let key = rel.split('/').fold(key, |k, p| k.join(p));
            // Each part came from an object_store path: no `..`, no separators.
            let path = rel.split('/').fold(dir.clone(), |p, part| p.join(part));
            self.fetch_file(&key, &path, *size, &mut progress).await?;
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

    async fn fetch_file(
        &self,
        key: &Key,
        path: &Path,
        size: u64,
        progress: &mut Progress<'_>,
    ) -> Result<(), Refusal> {
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
            progress.add(chunk.len() as u64);
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
    /// `wanted(model, complete, labels)`: as [`Wanted`], per model.
    pub async fn sync_all(
        &self,
        at_start: bool,
        wanted: &(dyn Fn(&str, &BTreeSet<u64>, &BTreeMap<String, u64>) -> BTreeSet<u64> + Sync),
    ) -> Result<BTreeMap<String, ModelSync>, String> {
        let listing = self.list().await?;
        let mut models: std::collections::BTreeSet<String> = listing.keys().cloned().collect();
        if let Ok((entries, _)) = self.cache.scan() {
            models.extend(entries.into_iter().map(|e| e.model));
        }
        let mut out = BTreeMap::new();
        let mut errors = 0;
        for model in models {
            let per_model = |c: &BTreeSet<u64>, l: &BTreeMap<String, u64>| wanted(&model, c, l);
            let news = self
                .sync_model(&model, listing.get(&model), at_start, &per_model)
                .await;
            errors += news.errors;
            out.insert(model, news);
        }
        if errors == 0 {
            self.synced();
        }
        Ok(out)
    }
}
