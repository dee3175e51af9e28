//! The manager's reconcile under every trigger, with a loader that counts, fails and
//! holds loads (no libtorch): what serves, what retires, and in which order.

use super::*;
use crate::backend::{IntraOp, Threading};
use crate::lifecycle::loader::LoadError;
use crate::lifecycle::registry::{ModelVersion, State};
use crate::lifecycle::{DeviceBudget, VersionPolicy};
use crate::metrics::Metrics;
use std::path::{Path, PathBuf};

/// A model that runs nothing: enough for the registry and the manager.
struct NoModel;

impl crate::backend::Model for NoModel {
    fn forward(
        &self,
        _: Vec<crate::tensor::Tensor>,
    ) -> Result<Vec<(String, crate::tensor::Tensor)>, String> {
        Ok(Vec::new())
    }
    fn device(&self) -> String {
        "cpu".into()
    }
}

fn manifest(model: &str, version: u64) -> String {
    format!(
        "[bundle]\nname = \"{model}\"\nversion = {version}\n\n[model]\nbackend = \"torchscript\"\npath = \"model/model.pt\"\n"
    )
}

fn servable(metrics: &Metrics, model: &str, version: u64, dir: &Path) -> Servable {
    let bundle = crate::bundle::Bundle {
        dir: dir.to_path_buf(),
        manifest: crate::bundle::parse_manifest(&manifest(model, version)).unwrap(),
    };
    let spec = bundle.manifest.model.clone().unwrap();
    let runner = Arc::new(crate::nn::Runner::new(
        Arc::new(NoModel),
        Vec::new(),
        &[],
        None,
        metrics.version(model, version),
        Threading {
            concurrency: 1,
            intra_op: IntraOp::Fixed(1),
        },
    ));
    Servable::Model(Arc::new(ModelVersion::new(
        bundle, spec, runner, None, None,
    )))
}

/// Counts loads, fails the versions in `fail`, and runs `during` inside each load (to
/// look at the registry while a load is under way).
#[derive(Default)]
struct FakeLoader {
    metrics: Arc<Metrics>,
    fail: Mutex<BTreeSet<u64>>,
    /// Versions a device budget refuses (not the bundle's fault).
    no_room: Mutex<BTreeSet<u64>>,
    /// When set, each load waits for a permit here, after telling `entered`.
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    entered: tokio::sync::Notify,
    loads: Mutex<Vec<u64>>,
    #[allow(clippy::type_complexity)]
    during: Mutex<Option<Box<dyn Fn(u64) + Send + Sync>>>,
}

impl Load for FakeLoader {
    fn load(&self, entry: Entry) -> futures::future::BoxFuture<'_, Result<Servable, LoadError>> {
        Box::pin(async move {
            self.loads.lock().unwrap().push(entry.version);
            if let Some(f) = self.during.lock().unwrap().as_ref() {
                f(entry.version);
            }
            // Let other triggers run in the middle of a load.
            tokio::task::yield_now().await;
            let gate = self.gate.lock().unwrap().clone();
            if let Some(gate) = gate {
                self.entered.notify_one();
                let _ = gate.acquire().await;
            }
            if self.fail.lock().unwrap().contains(&entry.version) {
                return Err(LoadError::Failed("the model does not load".into()));
            }
            if self.no_room.lock().unwrap().contains(&entry.version) {
                return Err(LoadError::NoRoom("no room on cpu now".into()));
            }
            Ok(servable(
                &self.metrics,
                &entry.model,
                entry.version,
                &entry.dir,
            ))
        })
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    loader: Arc<FakeLoader>,
    manager: Arc<Manager>,
}

fn setup(versions: &[u64], policy: VersionPolicy) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    for &v in versions {
        store_by_hand(&root, v);
    }
    let metrics = Arc::new(Metrics::new());
    let loader = Arc::new(FakeLoader {
        metrics: metrics.clone(),
        ..Default::default()
    });
    let registry = Arc::new(Registry::new(metrics, DeviceBudget::default()));
    let manager = Arc::new(Manager::new(
        LocalSource::new(&root),
        registry,
        loader.clone(),
        Policies {
            default: policy,
            per_model: Default::default(),
        },
        Default::default(),
        Uploads::new(2),
    ));
    Setup {
        _tmp: tmp,
        root,
        loader,
        manager,
    }
}

fn store_by_hand(root: &Path, v: u64) {
    let dir = root.join("m").join(v.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bundle.toml"), manifest("m", v)).unwrap();
}

fn state(r: &Registry, v: u64) -> Option<State> {
    r.status("m")?
        .into_iter()
        .find(|s| s.version == v)
        .map(|s| s.state)
}

/// The state once a retiring version's last handle has gone (its END is set by a task
/// woken by that drop).
async fn settled(r: &Registry, v: u64) -> Option<State> {
    let wait = async {
        while state(r, v) == Some(State::Unloading) {
            tokio::task::yield_now().await;
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), wait).await;
    state(r, v)
}

/// An upload's arrival: a checked bundle in scratch, loaded.
fn arrival(s: &Setup, v: u64) -> (tempfile::TempDir, PathBuf, Servable) {
    let scratch = s.manager.source.scratch().unwrap();
    let unpacked = scratch.path().join("bundle");
    std::fs::create_dir(&unpacked).unwrap();
    std::fs::write(unpacked.join("bundle.toml"), manifest("m", v)).unwrap();
    let servable = servable(&s.loader.metrics, "m", v, &unpacked);
    (scratch, unpacked, servable)
}

fn meta(digest: &str) -> VersionMeta {
    VersionMeta {
        digest: digest.into(),
        size: 0,
        uploaded_at: 0,
    }
}

#[tokio::test]
async fn the_newest_version_serves_and_a_failed_newer_one_leaves_the_older_serving() {
    let s = setup(&[1, 2, 3], VersionPolicy::Latest(1));
    s.loader.fail.lock().unwrap().insert(3);
    let report = s.manager.load_repository().await.unwrap();
    assert_eq!(report.loaded, vec!["m@2"]);
    assert_eq!(s.manager.registry.available_versions("m"), vec![2]);
    assert_eq!(state(&s.manager.registry, 3), Some(State::End));
    assert_eq!(
        *s.loader.loads.lock().unwrap(),
        vec![3, 2],
        "each tried once"
    );
    // A poll that finds nothing new loads nothing again.
    let guard = s.manager.guard("m");
    let present = s.manager.source.versions("m");
    assert!(!s.manager.settle(&mut *guard.lock().await, &present));
}

#[tokio::test]
async fn a_failed_version_is_tried_again_once_its_files_change_and_settle() {
    let s = setup(&[1, 2], VersionPolicy::Latest(1));
    s.loader.fail.lock().unwrap().insert(2);
    s.manager.load_repository().await.unwrap();
    assert_eq!(s.manager.registry.available_versions("m"), vec![1]);
    s.loader.fail.lock().unwrap().clear();
    std::fs::write(s.root.join("m/2/extra.txt"), "fixed").unwrap();
    let guard = s.manager.guard("m");
    let present = s.manager.source.versions("m");
    let mut st = guard.lock().await;
    assert!(
        !s.manager.settle(&mut st, &present),
        "changed: wait a full interval"
    );
    assert!(
        s.manager.settle(&mut st, &present),
        "unchanged since: admitted"
    );
    s.manager.reconcile_locked("m", &mut st, None).await;
    drop(st);
    assert_eq!(s.manager.registry.available_versions("m"), vec![2]);
    assert_eq!(settled(&s.manager.registry, 1).await, Some(State::End));
}

#[tokio::test]
async fn deleting_the_serving_version_loads_the_next_before_it_retires() {
    let s = setup(&[1, 2], VersionPolicy::Latest(1));
    s.manager.load_repository().await.unwrap();
    let serving = s.manager.registry.resolve("m", None).unwrap();
    assert_eq!(serving.version(), 2);
    // While version 1 loads, version 2 still answers: no request meets a 503.
    let registry = s.manager.registry.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    *s.loader.during.lock().unwrap() = Some(Box::new(move |v| {
        let now = registry.resolve("m", None).map(|s| s.version()).ok();
        seen2.lock().unwrap().push((v, now));
    }));
    s.manager.delete("m", 2).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![(1, Some(2))]);
    assert_eq!(s.manager.registry.available_versions("m"), vec![1]);
    assert!(!s.root.join("m/2").exists());
    // A request still holding version 2 keeps it UNLOADING; its drop ends it.
    assert_eq!(state(&s.manager.registry, 2), Some(State::Unloading));
    drop(serving);
    assert_eq!(settled(&s.manager.registry, 2).await, Some(State::End));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upload_poll_and_delete_load_once_and_never_publish_after_delete() {
    for round in 0..20 {
        let s = setup(&[1, 2], VersionPolicy::Latest(1));
        s.manager.load_repository().await.unwrap();
        s.loader.loads.lock().unwrap().clear();
        let (_scratch, unpacked, new) = arrival(&s, 3);
        let (m1, m2, m3) = (s.manager.clone(), s.manager.clone(), s.manager.clone());
        let upload =
            tokio::spawn(async move { m1.install("m", &unpacked, meta("sha256:3"), new).await });
        let poll = tokio::spawn(async move { m2.reconcile("m").await });
        let delete = tokio::spawn(async move { m3.delete("m", 2).await });
        let stored = upload.await.unwrap().unwrap();
        poll.await.unwrap();
        delete.await.unwrap().unwrap();
        let r = &s.manager.registry;
        assert_eq!(stored.state, Some("AVAILABLE"), "round {round}");
        assert_eq!(r.available_versions("m"), vec![3], "round {round}");
        assert!(
            r.resolve("m", Some(2)).is_err(),
            "round {round}: 2 serves after its delete"
        );
        let loads = s.loader.loads.lock().unwrap().clone();
        assert!(
            !loads.contains(&3),
            "round {round}: the upload's version loaded twice"
        );
        assert!(
            loads.iter().filter(|&&v| v == 1).count() <= 1,
            "round {round}: {loads:?}"
        );
        for v in [1, 2] {
            let end = settled(r, v).await;
            assert!(
                matches!(end, Some(State::End) | None),
                "round {round}: {v} is {end:?}"
            );
        }
        assert_eq!(
            s.manager.source.meta("m", 3).unwrap().digest,
            "sha256:3",
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_uploads_of_one_version_exactly_one_is_stored_and_its_digest_recorded() {
    for round in 0..20 {
        let s = setup(&[1], VersionPolicy::Latest(1));
        s.manager.load_repository().await.unwrap();
        let (_a, dir_a, new_a) = arrival(&s, 2);
        let (_b, dir_b, new_b) = arrival(&s, 2);
        let (ma, mb) = (s.manager.clone(), s.manager.clone());
        let a = tokio::spawn(async move { ma.install("m", &dir_a, meta("sha256:a"), new_a).await });
        let b = tokio::spawn(async move { mb.install("m", &dir_b, meta("sha256:b"), new_b).await });
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let (won, lost) = match (&a, &b) {
            (Ok(_), Err(UploadError::Conflict(m))) => ("sha256:a", m),
            (Err(UploadError::Conflict(m)), Ok(_)) => ("sha256:b", m),
            other => panic!("round {round}: {other:?}"),
        };
        assert!(
            lost.contains(&format!("exists with digest {won}")),
            "{lost}"
        );
        assert_eq!(s.manager.source.meta("m", 2).unwrap().digest, won);
        assert_eq!(s.manager.registry.available_versions("m"), vec![2]);
    }
}

#[tokio::test]
async fn an_upload_and_a_copy_by_hand_are_served_alike() {
    // Both paths go through reconcile: for an unloaded model neither serves (the upload
    // path used to publish whatever the model's state), for a loaded one both do.
    let s = setup(&[1], VersionPolicy::Latest(1));
    s.manager.load_repository().await.unwrap();
    s.manager.unload_model("m").await.unwrap();
    let (_scratch, unpacked, new) = arrival(&s, 2);
    let stored = s
        .manager
        .install("m", &unpacked, meta("sha256:2"), new)
        .await
        .unwrap();
    assert_eq!(stored.state, Some("END"));
    assert!(stored.note.unwrap().contains("the model is unloaded"));
    store_by_hand(&s.root, 3);
    let guard = s.manager.guard("m");
    let present = s.manager.source.versions("m");
    {
        let mut st = guard.lock().await;
        s.manager.settle(&mut st, &present);
        assert!(s.manager.settle(&mut st, &present));
        s.manager.reconcile_locked("m", &mut st, None).await;
    }
    assert!(s.manager.registry.available_versions("m").is_empty());
    s.manager.load_model("m", true).await.unwrap();
    assert_eq!(s.manager.registry.available_versions("m"), vec![3]);
    // Loaded again: an upload serves at once, as a copy by hand does after its interval.
    let (_scratch, unpacked, new) = arrival(&s, 4);
    let stored = s
        .manager
        .install("m", &unpacked, meta("sha256:4"), new)
        .await
        .unwrap();
    assert_eq!(stored.state, Some("AVAILABLE"));
    assert_eq!(s.manager.registry.available_versions("m"), vec![4]);
}

#[tokio::test]
async fn labels_keep_versions_serving_and_a_moved_label_lets_one_retire() {
    let s = setup(&[1, 2], VersionPolicy::Latest(1));
    s.manager.load_repository().await.unwrap();
    s.manager.set_label("m", "old", 1, true).await.unwrap();
    assert_eq!(s.manager.registry.available_versions("m"), vec![1, 2]);
    s.manager.set_label("m", "old", 2, false).await.unwrap();
    assert_eq!(s.manager.registry.available_versions("m"), vec![2]);
    assert_eq!(settled(&s.manager.registry, 1).await, Some(State::End));
}

#[tokio::test]
async fn refused_uploads_are_kept_to_a_bound_in_the_status_and_the_metrics() {
    let s = setup(&[1], VersionPolicy::Latest(1));
    s.manager.load_repository().await.unwrap();
    let r = &s.manager.registry;
    for v in 100..400 {
        r.fail("m", v, format!("upload {v} refused"), false);
    }
    let status = r.status("m").unwrap();
    assert_eq!(status.len(), 1 + crate::lifecycle::registry::FAILURES_KEPT);
    assert!(
        status.iter().any(|s| s.version == 399),
        "the newest are kept"
    );
    assert!(!status.iter().any(|s| s.version == 100), "the oldest go");
    let text = r.metrics().encode();
    let series = text
        .lines()
        .filter(|l| l.starts_with("nnserve_versions") && l.contains("model=\"m\""))
        .count();
    assert_eq!(
        series,
        1 + crate::lifecycle::registry::FAILURES_KEPT,
        "{text}"
    );
}

#[tokio::test]
async fn a_version_loaded_again_while_it_retires_stays_available() {
    let s = setup(&[1], VersionPolicy::Latest(1));
    s.manager.load_repository().await.unwrap();
    let in_flight = s.manager.registry.resolve("m", Some(1)).unwrap();
    s.manager.unload_model("m").await.unwrap();
    assert_eq!(state(&s.manager.registry, 1), Some(State::Unloading));
    s.manager.load_model("m", true).await.unwrap();
    drop(in_flight);
    assert_eq!(
        settled(&s.manager.registry, 1).await,
        Some(State::Available)
    );
    assert_eq!(s.manager.registry.available_versions("m"), vec![1]);
}

#[tokio::test]
async fn a_version_a_budget_refused_is_tried_again_by_the_next_poll() {
    let s = setup(&[1, 2], VersionPolicy::Latest(1));
    s.loader.no_room.lock().unwrap().insert(2);
    s.manager.load_repository().await.unwrap();
    assert_eq!(s.manager.registry.available_versions("m"), vec![1]);
    // The room is there now; the files did not change, yet the next poll tries again.
    s.loader.no_room.lock().unwrap().clear();
    let guard = s.manager.guard("m");
    let present = s.manager.source.versions("m");
    let mut st = guard.lock().await;
    assert!(s.manager.settle(&mut st, &present));
    s.manager.reconcile_locked("m", &mut st, None).await;
    drop(st);
    assert_eq!(s.manager.registry.available_versions("m"), vec![2]);
}

#[tokio::test]
async fn a_stored_version_once_refused_is_never_forgotten_with_the_refusals() {
    let s = setup(&[10], VersionPolicy::Latest(1));
    s.manager.load_repository().await.unwrap();
    let r = &s.manager.registry;
    r.fail("m", 5, "refused".into(), false);
    // Uploaded again, fixed: stored, not served under latest = 1.
    let (_scratch, unpacked, new) = arrival(&s, 5);
    let stored = s
        .manager
        .install("m", &unpacked, meta("sha256:5"), new)
        .await
        .unwrap();
    assert_eq!(stored.state, Some("END"));
    for v in 100..120 {
        r.fail("m", v, "refused".into(), false);
    }
    assert_eq!(
        state(r, 5),
        Some(State::End),
        "the stored version's status stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_whose_client_goes_away_still_runs_to_its_end() {
    let s = setup(&[1, 2], VersionPolicy::Latest(1));
    s.manager.load_repository().await.unwrap();
    // The caller gives up while version 1 loads (hyper drops a handler whose client left):
    // the load is held until the caller's future has been dropped.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *s.loader.gate.lock().unwrap() = Some(gate.clone());
    {
        let call = s.manager.delete("m", 2);
        tokio::select! {
            _ = call => panic!("the delete ended while its load was held"),
            _ = s.loader.entered.notified() => {}
        }
    } // the caller's future is dropped here, mid-load
    gate.add_permits(1);
    let r = s.manager.registry.clone();
    let root = s.root.clone();
    let done = async {
        while !(r.available_versions("m") == vec![1] && !root.join("m/2").exists()) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), done)
        .await
        .expect("the delete ran to its end");
    // Nothing is left marked for deletion: a new copy of version 2 is admitted again.
    store_by_hand(&s.root, 2);
    let guard = s.manager.guard("m");
    let present = s.manager.source.versions("m");
    let mut st = guard.lock().await;
    s.manager.settle(&mut st, &present);
    assert!(
        s.manager.settle(&mut st, &present),
        "version 2 admitted again"
    );
}

/// Replicas on one object store (object_store's in-memory store): each a manager with
/// its own cache, as `--repository s3://...` runs them.
mod replicas {
    use super::*;
    use crate::lifecycle::objects::ObjectRepo;
    use object_store::{ObjectStore, ObjectStoreExt};

    fn replica(store: &Arc<dyn ObjectStore>, tmp: &Path, name: &str) -> Setup {
        let cache = tmp.join(name);
        let objects = Arc::new(ObjectRepo::new(
            store.clone(),
            object_store::path::Path::from("repo"),
            "s3://test/repo".into(),
            cache.clone(),
            None,
            Default::default(),
        ));
        let metrics = Arc::new(Metrics::new());
        let loader = Arc::new(FakeLoader {
            metrics: metrics.clone(),
            ..Default::default()
        });
        let registry = Arc::new(Registry::new(metrics, DeviceBudget::default()));
        let manager = Arc::new(
            Manager::new(
                LocalSource::new(&cache),
                registry,
                loader.clone(),
                Policies {
                    default: VersionPolicy::Latest(1),
                    per_model: Default::default(),
                },
                Default::default(),
                Uploads::new(2),
            )
            .with_objects(objects),
        );
        Setup {
            _tmp: tempfile::tempdir().unwrap(),
            root: cache,
            loader,
            manager,
        }
    }

    /// An upload's last step on replica `s`: the checked bundle, with its real digest.
    async fn upload(s: &Setup, v: u64) -> Result<Stored, UploadError> {
        let (_scratch, unpacked, servable) = arrival(s, v);
        let digest = crate::archive::digest(&unpacked).unwrap();
        s.manager
            .install("m", &unpacked, meta(&digest), servable)
            .await
    }

    async fn poll(s: &Setup) {
        let objects = s.manager.objects.clone().unwrap();
        s.manager.sync_bucket(&objects).await.unwrap();
    }

    #[tokio::test]
    async fn an_upload_label_and_delete_on_one_replica_reach_the_other() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let a = replica(&store, tmp.path(), "a");
        let b = replica(&store, tmp.path(), "b");
        let stored = upload(&a, 1).await.unwrap();
        assert_eq!(stored.state, Some("AVAILABLE"));
        assert_eq!(a.manager.registry.available_versions("m"), vec![1]);
        assert!(b.manager.registry.available_versions("m").is_empty());
        poll(&b).await;
        assert_eq!(b.manager.registry.available_versions("m"), vec![1]);

        // v2 on a: a serves it at once, b after its poll; v1 retires on both.
        upload(&a, 2).await.unwrap();
        assert_eq!(a.manager.registry.available_versions("m"), vec![2]);
        poll(&b).await;
        assert_eq!(b.manager.registry.available_versions("m"), vec![2]);
        assert_eq!(settled(&b.manager.registry, 1).await, Some(State::End));

        // A label on b pins v1 on both.
        b.manager.set_label("m", "stable", 1, true).await.unwrap();
        poll(&a).await;
        assert_eq!(a.manager.registry.labels("m").get("stable"), Some(&1));
        assert_eq!(a.manager.registry.available_versions("m"), vec![1, 2]);

        // A delete of a labelled version is refused; unlabelled, it leaves both.
        let refused = a.manager.delete("m", 1).await.unwrap_err();
        assert!(matches!(refused, UploadError::Conflict(_)), "{refused:?}");
        b.manager.set_label("m", "stable", 2, false).await.unwrap();
        poll(&a).await;
        a.manager.delete("m", 1).await.unwrap();
        poll(&b).await;
        for s in [&a, &b] {
            assert_eq!(s.manager.registry.available_versions("m"), vec![2]);
            assert!(!s.manager.source.is_stored("m", 1));
        }
        // The same version uploaded again on b with other content: 409, from the bucket.
        let (_scratch, unpacked, servable) = arrival(&b, 2);
        std::fs::write(unpacked.join("extra"), b"other").unwrap();
        let digest = crate::archive::digest(&unpacked).unwrap();
        let conflict = b
            .manager
            .install("m", &unpacked, meta(&digest), servable)
            .await
            .unwrap_err();
        assert!(matches!(conflict, UploadError::Conflict(_)), "{conflict:?}");
    }

    #[tokio::test]
    async fn a_bad_version_in_the_bucket_is_refused_with_its_reason_and_the_old_one_serves() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let a = replica(&store, tmp.path(), "a");
        let b = replica(&store, tmp.path(), "b");
        upload(&a, 1).await.unwrap();
        poll(&b).await;
        // v2's record names a digest its files do not have.
        let put = |k: &str, body: Vec<u8>| {
            let store = store.clone();
            let k = object_store::path::Path::from(k);
            async move { store.put(&k, body.into()).await.unwrap() }
        };
        put("repo/m/2/bundle.toml", manifest("m", 2).into_bytes()).await;
        put("repo/m/.meta/2.claim", b"{}".to_vec()).await;
        put(
            "repo/m/.meta/2.json",
            serde_json::to_vec(&meta("sha256:0000")).unwrap(),
        )
        .await;
        poll(&b).await;
        assert_eq!(b.manager.registry.available_versions("m"), vec![1]);
        let v2 = b
            .manager
            .registry
            .status("m")
            .unwrap()
            .into_iter()
            .find(|s| s.version == 2)
            .expect("v2 is reported");
        assert_eq!(v2.state, State::End);
        assert!(
            v2.error
                .as_deref()
                .unwrap_or("")
                .contains("do not match its record"),
            "{:?}",
            v2.error
        );
        // A version whose files load badly (copied in by hand) fails like a bad upload.
        b.loader.fail.lock().unwrap().insert(3);
        put("repo/m/3/bundle.toml", manifest("m", 3).into_bytes()).await;
        poll(&b).await; // seen
        poll(&b).await; // unchanged for a poll: synced, fails to load
        assert_eq!(state(&b.manager.registry, 3), Some(State::End));
        assert_eq!(b.manager.registry.available_versions("m"), vec![1]);
    }
}
