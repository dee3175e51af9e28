//! The manager's side of an object-store repository: each poll's sync of the bucket
//! into the cache, what a replica holds of it, and the count of this replica's own
//! writes that keeps a poll from undoing them.

use super::*;

impl Manager {
    /// One poll of the object store: one LIST, then each model's sync into the cache
    /// under its guard (a model busy with an upload or a delete is looked at next
    /// round), its news admitted, and the model reconciled.
    pub(super) async fn sync_bucket(&self, objects: &ObjectRepo) -> Result<(), String> {
        // Writes this replica makes while the LIST is under way would be missing from
        // it: a model written to since is left to the next poll (else its sync would
        // take a version just uploaded for one that left the bucket).
        let written = self.written.lock().unwrap().clone();
        let listing = objects.list().await?;
        let mut models: BTreeSet<String> = listing.keys().cloned().collect();
        models.extend(self.guards.lock().unwrap().keys().cloned());
        let mut errors = 0;
        for model in models {
            let guard = self.guard(&model);
            let Ok(mut st) = guard.try_lock() else {
                continue;
            };
            if self.written.lock().unwrap().get(&model) != written.get(&model) {
                continue;
            }
            let failed: BTreeSet<u64> = st.failed.keys().copied().collect();
            let unloaded = st.unloaded;
            let wanted = |complete: &BTreeSet<u64>, labels: &BTreeMap<String, u64>| {
                if unloaded {
                    BTreeSet::new()
                } else {
                    self.wanted(&model, complete, labels, &failed)
                }
            };
            let news = objects
                .sync_model(&model, listing.get(&model), false, &wanted)
                .await;
            errors += news.errors;
            if news.is_empty() {
                continue;
            }
            for v in news.installed.iter().chain(&news.replaced) {
                st.admitted.insert(*v);
                st.failed.remove(v);
                st.pending.remove(v);
            }
            if !news.replaced.is_empty() {
                // Other content under a serving version number: it reloads (its requests
                // in flight finish on the old content).
                let replaced: BTreeSet<u64> = news.replaced.iter().copied().collect();
                tracing::warn!(model, versions = ?replaced, "a version's content changed in the bucket: reloading it");
                self.registry.retire(&model, &replaced);
            }
            for (v, reason) in news.refused {
                self.registry.fail(
                    &model,
                    v,
                    format!("refused from the object store: {reason}"),
                    false,
                );
            }
            if let Some(labels) = news.labels {
                self.registry.restore_labels(&model, labels);
            }
            self.reconcile_locked(&model, &mut st, None).await;
        }
        if errors == 0 {
            objects.synced();
            Ok(())
        } else {
            Err(format!("{errors} objects could not be synced"))
        }
    }

    /// Which of a model's complete versions in the object store this replica holds: what
    /// its version policy would serve of them, with the bucket's labels, passing over
    /// versions that failed to load here (so that an older one is fetched in their place).
    pub fn wanted(
        &self,
        model: &str,
        complete: &BTreeSet<u64>,
        labels: &BTreeMap<String, u64>,
        failed: &BTreeSet<u64>,
    ) -> BTreeSet<u64> {
        let labelled: BTreeSet<u64> = labels.values().copied().collect();
        policy::aspired(self.policies.get(model), complete, &labelled, failed)
    }

    /// Marks a write of this replica to a model in the object store (see `sync_bucket`).
    pub(super) fn wrote(&self, model: &str) {
        *self
            .written
            .lock()
            .unwrap()
            .entry(model.to_string())
            .or_default() += 1;
    }
}
