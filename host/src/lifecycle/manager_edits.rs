//! Versions edited in place: a version served from files copied into the local
//! repository by hand whose files change (a rebuilt plugin, `nnserve dev`) is loaded
//! again once the change has held for a poll interval, and swapped in as the same
//! version; requests in flight finish on the old one.

use super::*;

impl Manager {
    /// Serving versions whose files were edited in place: reloaded once the change has
    /// held for a full interval (never with an object store, whose cache it owns).
    pub(super) fn settle_edits(&self, st: &mut ModelState, present: &BTreeMap<u64, Entry>) -> bool {
        let mut changed = false;
        st.changing.retain(|v, _| st.loaded.contains_key(v));
        for (v, entry) in present {
            let Some(Some(loaded)) = st.loaded.get(v) else {
                continue;
            };
            let Some(fp) = LocalSource::fingerprint(&entry.dir) else {
                continue;
            };
            if fp == *loaded {
                st.changing.remove(v);
            } else if st.changing.get(v) == Some(&fp) && crate::bundle::is_version_dir(&entry.dir) {
                st.changing.remove(v);
                st.reload.insert(*v);
                changed = true;
            } else {
                st.changing.insert(*v, fp);
            }
        }
        changed
    }

    /// Loads each version of `st.reload` again from its edited files and swaps it in
    /// (requests in flight finish on the old one). One that no longer loads keeps
    /// serving what it loaded before, with a warning; its files are looked at again
    /// when they change.
    pub(super) async fn reload_edited(
        &self,
        model: &str,
        st: &mut ModelState,
        on_disk: &BTreeMap<u64, Entry>,
    ) {
        for version in std::mem::take(&mut st.reload) {
            let Some(entry) = on_disk.get(&version).cloned() else {
                continue;
            };
            if !self.registry.available_versions(model).contains(&version) {
                continue;
            }
            tracing::info!(
                model,
                version,
                "its files changed: reloading the version in place"
            );
            let started = std::time::Instant::now();
            match self.loader.load(entry.clone()).await {
                Ok(servable) => {
                    // The record first: whoever sees the new version sees its digest.
                    let (source, m, dir) =
                        (self.source.clone(), model.to_string(), entry.dir.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        source.ensure_meta(&m, version, &dir, true)
                    })
                    .await;
                    log_available(&servable, started.elapsed());
                    self.registry.publish(servable);
                }
                Err(e) => tracing::warn!(
                    model,
                    version,
                    "its changed files do not load ({e}); it keeps serving what it loaded before"
                ),
            }
            st.loaded
                .insert(version, LocalSource::fingerprint(&entry.dir));
        }
    }
}
