//! The sync between a bucket and a replica's cache, against object_store's in-memory
//! store (which keeps S3's conditional-write rules) and its local-filesystem store (a
//! repository directory used as a bucket, as `aws s3 sync` would copy it). The moto S3
//! server and real replicas are in tests/e2e/test_object_store.py.

use super::test_stores::{Counting, Moto};
use super::*;
use object_store::memory::InMemory;
use std::sync::atomic::Ordering;

/// Every complete version is wanted (a policy of "all").
fn all(_: &str, complete: &BTreeSet<u64>, _: &BTreeMap<String, u64>) -> BTreeSet<u64> {
    complete.clone()
}

/// A replica: a repository on `store` under `repo/`, with a cache of its own.
fn replica(store: Arc<dyn ObjectStore>, cache: &Path) -> ObjectRepo {
    ObjectRepo::new(
        store,
        Key::from("repo"),
        "s3://test/repo".into(),
        cache.to_path_buf(),
        None,
        crate::archive::Limits::default(),
    )
}

/// A bundle directory (manifest and a weights file) and its record.
fn bundle(dir: &Path, model: &str, version: u64, weights: &[u8]) -> VersionMeta {
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(
        dir.join("bundle.toml"),
        format!("[bundle]\nname = \"{model}\"\nversion = {version}\n"),
    )
    .unwrap();
    std::fs::write(dir.join("model/model.pt"), weights).unwrap();
    VersionMeta {
        digest: crate::archive::digest(dir).unwrap(),
        size: weights.len() as u64,
        uploaded_at: 1,
    }
}

async fn put(store: &dyn ObjectStore, key: &str, body: &[u8]) {
    store
        .put(&Key::from(key), body.to_vec().into())
        .await
        .unwrap();
}

async fn an_upload_reaches_another_replica_whole_and_checked(store: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    let b = replica(store.clone(), &tmp.path().join("b"));
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 1, b"weights");
    a.publish("m", 1, &src, &meta).await.unwrap();

    let news = b.sync_all(false, &all).await.unwrap();
    assert_eq!(news["m"].installed, vec![1]);
    assert_eq!(b.cache.meta("m", 1), Some(meta.clone()));
    assert_eq!(
        std::fs::read(b.cache.root.join("m/1/model/model.pt")).unwrap(),
        b"weights"
    );
    assert!(b.health.healthy());
    // Nothing left in the scratch area; the claim and the record are in the bucket.
    let scratch = b.cache.root.join(".tmp");
    assert!(!scratch.exists() || std::fs::read_dir(&scratch).unwrap().next().is_none());
    let keys: Vec<String> = store
        .list(Some(&Key::from("repo/m/.meta")))
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    assert!(
        keys.contains(&"repo/m/.meta/1.json".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"repo/m/.meta/1.claim".to_string()),
        "{keys:?}"
    );
}

async fn a_version_without_its_record_is_never_synced_while_it_is_claimed(
    store: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let b = replica(store.clone(), &tmp.path().join("b"));
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 1, b"weights");
    // An upload under way: the claim and every file, but not the record yet.
    put(&*store, "repo/m/.meta/1.claim", b"{}").await;
    put(
        &*store,
        "repo/m/1/bundle.toml",
        &std::fs::read(src.join("bundle.toml")).unwrap(),
    )
    .await;
    put(&*store, "repo/m/1/model/model.pt", b"weights").await;
    for _ in 0..3 {
        let news = b.sync_all(false, &all).await.unwrap();
        assert!(news["m"].installed.is_empty(), "{news:?}");
        assert!(!b.cache.is_stored("m", 1));
    }
    // The record, written last, completes it.
    put(
        &*store,
        "repo/m/.meta/1.json",
        &serde_json::to_vec(&meta).unwrap(),
    )
    .await;
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].installed,
        vec![1]
    );
}

async fn of_two_uploads_racing_for_one_version_exactly_one_claims_it(store: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    let b = replica(store.clone(), &tmp.path().join("b"));
    let (sa, sb) = (tmp.path().join("sa"), tmp.path().join("sb"));
    let (ma, mb) = (bundle(&sa, "m", 1, b"aaaa"), bundle(&sb, "m", 1, b"bbbb"));
    for _ in 0..10 {
        let (ra, rb) = tokio::join!(a.publish("m", 1, &sa, &ma), b.publish("m", 1, &sb, &mb));
        assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
        let (winner, loser) = if ra.is_ok() { (&ma, rb) } else { (&mb, ra) };
        // The loser wrote nothing and learns the winner's record (or that one is coming).
        match loser {
            Err(WriteError::Taken(Some(r))) => assert_eq!(r.digest, winner.digest),
            Err(WriteError::Taken(None)) => {}
            other => panic!("{other:?}"),
        }
        let c = replica(store.clone(), &tmp.path().join("c"));
        c.sync_all(false, &all).await.unwrap();
        assert_eq!(c.cache.meta("m", 1).unwrap().digest, winner.digest);
        a.delete_version("m", 1).await.unwrap();
        c.sync_all(false, &all).await.unwrap();
        assert!(!c.cache.is_stored("m", 1));
    }
}

async fn a_changed_object_is_refused_and_not_fetched_again_until_it_changes(
    inner: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Counting::new(inner.clone());
    let a = replica(inner.clone(), &tmp.path().join("a"));
    let b = replica(store.clone(), &tmp.path().join("b"));
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 1, b"weights");
    a.publish("m", 1, &src, &meta).await.unwrap();
    // Someone overwrites the weights in the bucket.
    put(&*inner, "repo/m/1/model/model.pt", b"tampered").await;
    let news = b.sync_all(false, &all).await.unwrap();
    let (v, reason) = &news["m"].refused[0];
    assert_eq!(*v, 1);
    assert!(reason.contains("do not match its record"), "{reason}");
    assert!(!b.cache.is_stored("m", 1));
    let gets = store.counts().1;
    assert!(b.sync_all(false, &all).await.unwrap()["m"].is_empty());
    assert_eq!(
        store.counts().1,
        gets,
        "a refused version is not downloaded again"
    );
    // Put right, it is tried again and synced.
    put(&*inner, "repo/m/1/model/model.pt", b"weights").await;
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].installed,
        vec![1]
    );
}

async fn a_poll_that_finds_nothing_new_makes_one_list_request_and_downloads_nothing(
    inner: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Counting::new(inner.clone());
    let a = replica(inner.clone(), &tmp.path().join("a"));
    let b = replica(store.clone(), &tmp.path().join("b"));
    for (model, v) in [("m", 1), ("m", 2), ("n", 1)] {
        let src = tmp.path().join(format!("src-{model}-{v}"));
        let meta = bundle(&src, model, v, b"w");
        a.publish(model, v, &src, &meta).await.unwrap();
    }
    a.set_label("m", "stable", 1).await.unwrap();
    b.sync_all(false, &all).await.unwrap();
    let before = store.counts();
    let news = b.sync_all(false, &all).await.unwrap();
    assert!(news.values().all(ModelSync::is_empty), "{news:?}");
    let after = store.counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (1, 0, 0),
        "lists, gets, puts of a poll with no change"
    );
}

async fn a_hand_copy_is_synced_once_it_has_not_changed_for_a_poll(store: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let b = replica(store.clone(), &tmp.path().join("b"));
    // `aws s3 sync` of a version directory: files, no claim, no record.
    put(&*store, "repo/m/3/model/model.pt", b"w").await;
    assert!(b.sync_all(false, &all).await.unwrap()["m"]
        .installed
        .is_empty());
    put(
        &*store,
        "repo/m/3/bundle.toml",
        b"[bundle]\nname = \"m\"\nversion = 3\n",
    )
    .await;
    assert!(
        b.sync_all(false, &all).await.unwrap()["m"]
            .installed
            .is_empty(),
        "still changing"
    );
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].installed,
        vec![3]
    );
    let digest = crate::archive::digest(&b.cache.root.join("m/3")).unwrap();
    assert_eq!(b.cache.meta("m", 3).unwrap().digest, digest);
    // Copied again with other content: synced again once it settles, as on disk.
    put(&*store, "repo/m/3/model/model.pt", b"fixed").await;
    assert!(
        b.sync_all(false, &all).await.unwrap()["m"].is_empty(),
        "still changing"
    );
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].replaced,
        vec![3]
    );
    assert_eq!(
        std::fs::read(b.cache.root.join("m/3/model/model.pt")).unwrap(),
        b"fixed"
    );
    assert!(b.sync_all(false, &all).await.unwrap()["m"].is_empty());
    // Copied again while the replica is down: the restarted replica replaces its copy.
    drop(b);
    put(&*store, "repo/m/3/model/model.pt", b"fixed again").await;
    let b = replica(store.clone(), &tmp.path().join("b"));
    assert_eq!(b.check_cache(), 1);
    let news = b.sync_all(false, &all).await.unwrap();
    assert!(news["m"].replaced.is_empty(), "still to settle: {news:?}");
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].replaced,
        vec![3]
    );
    assert_eq!(
        std::fs::read(b.cache.root.join("m/3/model/model.pt")).unwrap(),
        b"fixed again"
    );
    // At start-up a hand copy is taken at once, as a local repository's directories are.
    put(
        &*store,
        "repo/n/1/bundle.toml",
        b"[bundle]\nname = \"n\"\nversion = 1\n",
    )
    .await;
    let c = replica(store.clone(), &tmp.path().join("c"));
    assert_eq!(
        c.sync_all(true, &all).await.unwrap()["n"].installed,
        vec![1]
    );
}

async fn a_restart_reuses_a_valid_cache_and_replaces_a_damaged_one(inner: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(inner.clone(), &tmp.path().join("a"));
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 1, b"weights");
    a.publish("m", 1, &src, &meta).await.unwrap();
    let cache = tmp.path().join("b");
    replica(inner.clone(), &cache)
        .sync_all(false, &all)
        .await
        .unwrap();

    // Restarted: the cache is valid, so nothing is downloaded (the record is read once).
    let store = Counting::new(inner.clone());
    let b = replica(store.clone(), &cache);
    assert_eq!(b.check_cache(), 1);
    assert!(b.sync_all(false, &all).await.unwrap()["m"]
        .installed
        .is_empty());
    assert_eq!(store.counts().1, 2, "the record and the labels, no file");

    // Restarted after the cache was damaged: the version is dropped and fetched again.
    std::fs::write(cache.join("m/1/model/model.pt"), b"damaged").unwrap();
    let b = replica(inner.clone(), &cache);
    assert_eq!(b.check_cache(), 0);
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].installed,
        vec![1]
    );
    assert_eq!(
        std::fs::read(cache.join("m/1/model/model.pt")).unwrap(),
        b"weights"
    );
}

async fn label_changes_from_two_replicas_at_once_both_land(store: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    let b = replica(store.clone(), &tmp.path().join("b"));
    for v in [1, 2] {
        let src = tmp.path().join(format!("src{v}"));
        let meta = bundle(&src, "m", v, b"w");
        a.publish("m", v, &src, &meta).await.unwrap();
    }
    for round in 0..20u64 {
        let (la, lb) = (format!("a{round}"), format!("b{round}"));
        let (ra, rb) = tokio::join!(a.set_label("m", &la, 1), b.set_label("m", &lb, 2));
        ra.unwrap();
        rb.unwrap();
    }
    let (doc, _) = a.read_labels("m").await.unwrap();
    assert_eq!(doc.labels.len(), 40, "{doc:?}");
}

async fn a_labelled_version_is_not_deleted_and_a_delete_removes_it_everywhere(
    store: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    let b = replica(store.clone(), &tmp.path().join("b"));
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 1, b"weights");
    a.publish("m", 1, &src, &meta).await.unwrap();
    b.sync_all(false, &all).await.unwrap();
    a.set_label("m", "stable", 1).await.unwrap();
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].labels,
        Some(BTreeMap::from([("stable".to_string(), 1)]))
    );
    match a.delete_version("m", 1).await {
        Err(WriteError::Conflict(m)) => assert!(m.contains("stable"), "{m}"),
        other => panic!("{other:?}"),
    }
    a.update_labels("m", |d| {
        d.labels.clear();
        Ok(())
    })
    .await
    .unwrap();
    a.delete_version("m", 1).await.unwrap();
    let news = b.sync_all(false, &all).await.unwrap();
    assert_eq!(news["m"].removed, vec![1]);
    assert!(!b.cache.is_stored("m", 1));
    let left: Vec<_> = store.list(None).collect().await;
    assert_eq!(left.len(), 1, "only the labels object is left: {left:?}");
}

#[tokio::test]
async fn a_repository_directory_serves_as_a_bucket() {
    // A local repository as `aws s3 sync` would copy it, read through object_store's
    // file-system store: the records written on disk are the bucket's records.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("bucket");
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 1, b"weights");
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    crate::repository::install(&repo, "m", 1, &src, &meta).unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap());
    let b = replica(store, &tmp.path().join("b"));
    assert_eq!(
        b.sync_all(false, &all).await.unwrap()["m"].installed,
        vec![1]
    );
    assert_eq!(b.cache.meta("m", 1), Some(meta));
}

async fn keys_that_are_not_a_version_are_skipped_and_bounds_hold(store: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    for key in [
        "repo/bad name/1/bundle.toml",
        "repo/m/latest/bundle.toml",
        "repo/m/0/bundle.toml",
        "repo/m/.meta/x.json",
        "repo/README",
        "other/m/1/bundle.toml",
    ] {
        put(&*store, key, b"x").await;
    }
    let b = replica(store.clone(), &tmp.path().join("b"));
    let listing = b.list().await.unwrap();
    assert!(
        listing.get("m").is_none_or(|m| m.versions.is_empty()),
        "{listing:?}"
    );
    assert_eq!(listing.len(), listing.get("m").map_or(0, |_| 1));
    // A record that is too large to be one is refused, not read whole.
    put(
        &*store,
        "repo/m/1/bundle.toml",
        b"[bundle]\nname = \"m\"\nversion = 1\n",
    )
    .await;
    put(&*store, "repo/m/.meta/1.json", &vec![b' '; 1 << 17]).await;
    let news = b.sync_all(false, &all).await.unwrap();
    assert!(news["m"].refused[0].1.contains("more than"), "{news:?}");
}

async fn only_the_versions_the_policy_wants_are_downloaded(store: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    for v in [1, 2, 3] {
        let src = tmp.path().join(format!("src{v}"));
        let meta = bundle(&src, "m", v, format!("w{v}").as_bytes());
        a.publish("m", v, &src, &meta).await.unwrap();
    }
    a.set_label("m", "stable", 1).await.unwrap();
    // `latest 1` with labels: the newest and the labelled.
    let latest = |_: &str, c: &BTreeSet<u64>, l: &BTreeMap<String, u64>| -> BTreeSet<u64> {
        c.iter()
            .max()
            .into_iter()
            .chain(l.values())
            .copied()
            .collect()
    };
    let b = replica(store.clone(), &tmp.path().join("b"));
    let news = b.sync_all(false, &latest).await.unwrap();
    assert_eq!(news["m"].installed, vec![1, 3]);
    assert!(!b.cache.is_stored("m", 2));
}

async fn a_listing_that_fails_half_way_removes_nothing(inner: Arc<dyn ObjectStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Counting::new(inner.clone());
    let a = replica(inner.clone(), &tmp.path().join("a"));
    for v in [1, 2] {
        let src = tmp.path().join(format!("src{v}"));
        let meta = bundle(&src, "m", v, b"w");
        a.publish("m", v, &src, &meta).await.unwrap();
    }
    let b = replica(store.clone(), &tmp.path().join("b"));
    b.sync_all(false, &all).await.unwrap();
    store.fail_lists.store(true, Ordering::SeqCst);
    assert!(b.sync_all(false, &all).await.is_err());
    assert!(b.cache.is_stored("m", 1) && b.cache.is_stored("m", 2));
    assert!(!b.health.healthy());
}

async fn a_delete_and_a_label_change_racing_never_leave_a_label_on_a_deleted_version(
    store: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    let b = replica(store.clone(), &tmp.path().join("b"));
    for round in 0..10u64 {
        let v = round + 1;
        let src = tmp.path().join(format!("src{v}"));
        let meta = bundle(&src, "m", v, b"w");
        a.publish("m", v, &src, &meta).await.unwrap();
        let (deleted, labelled) = tokio::join!(a.delete_version("m", v), b.set_label("m", "x", v));
        let (doc, _) = a.read_labels("m").await.unwrap();
        match (deleted, labelled) {
            (Ok(()), Err(WriteError::Conflict(_))) => assert_ne!(doc.labels.get("x"), Some(&v)),
            (Err(WriteError::Conflict(_)), Ok(_)) => assert_eq!(doc.labels.get("x"), Some(&v)),
            other => panic!("round {round}: {other:?}"),
        }
        assert!(doc.deleting.is_empty(), "{doc:?}");
    }
}

async fn an_upload_under_way_cannot_be_deleted_but_an_abandoned_one_can(
    store: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claim = |at: u64| format!(r#"{{"digest":"d","claimed_at":{at},"token":"t"}}"#);
    put(&*store, "repo/m/.meta/1.claim", claim(now).as_bytes()).await;
    put(&*store, "repo/m/1/bundle.toml", b"x").await;
    match a.delete_version("m", 1).await {
        Err(WriteError::Conflict(m)) => assert!(m.contains("being uploaded"), "{m}"),
        other => panic!("{other:?}"),
    }
    put(
        &*store,
        "repo/m/.meta/1.claim",
        claim(now - CLAIM_TIMEOUT_SECS - 1).as_bytes(),
    )
    .await;
    a.delete_version("m", 1).await.unwrap();
    assert_eq!(a.is_stored("m", 1).await, Some(false));
}

async fn an_upload_over_files_copied_by_hand_is_refused_and_writes_nothing(
    store: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    put(&*store, "repo/m/4/model/model.pt", b"by hand").await;
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 4, b"w");
    match a.publish("m", 4, &src, &meta).await {
        Err(WriteError::Conflict(m)) => assert!(m.contains("copy by hand"), "{m}"),
        other => panic!("{other:?}"),
    }
    let keys: Vec<String> = store
        .list(None)
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    assert_eq!(
        keys,
        vec!["repo/m/4/model/model.pt".to_string()],
        "the claim is given back"
    );
}

async fn a_labels_object_that_is_not_one_keeps_the_labels_and_refuses_changes(
    store: Arc<dyn ObjectStore>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(store.clone(), &tmp.path().join("a"));
    let src = tmp.path().join("src");
    let meta = bundle(&src, "m", 1, b"w");
    a.publish("m", 1, &src, &meta).await.unwrap();
    a.set_label("m", "stable", 1).await.unwrap();
    let b = replica(store.clone(), &tmp.path().join("b"));
    b.sync_all(false, &all).await.unwrap();
    put(&*store, "repo/m/.meta/labels.json", b"{\"stable\": ").await;
    let news = b.sync_all(false, &all).await.unwrap();
    assert_eq!(news["m"].labels, None, "the labels stay as they were");
    assert!(news["m"].errors > 0);
    assert_eq!(b.cache.labels("m").get("stable"), Some(&1));
    match b.set_label("m", "canary", 1).await {
        Err(WriteError::Store(m)) => assert!(m.contains("fix it"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// Every scenario above, against object_store's in-memory store and against moto's S3
/// server (real HTTP, S3's ETags and conditional-write answers).
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod in_memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(Arc::new(InMemory::new())).await
                }
            )*
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_scenario_against_moto_s3() {
            let names = [$(stringify!($name)),*];
            let Some(moto) = Moto::start(names.len()) else {
                return;
            };
            let mut bucket = 0;
            $(
                eprintln!("moto: {}", stringify!($name));
                $name(moto.bucket(bucket)).await;
                bucket += 1;
            )*
            assert_eq!(bucket, names.len());
        }
    };
}

scenarios!(
    an_upload_reaches_another_replica_whole_and_checked,
    a_version_without_its_record_is_never_synced_while_it_is_claimed,
    of_two_uploads_racing_for_one_version_exactly_one_claims_it,
    a_changed_object_is_refused_and_not_fetched_again_until_it_changes,
    a_poll_that_finds_nothing_new_makes_one_list_request_and_downloads_nothing,
    a_hand_copy_is_synced_once_it_has_not_changed_for_a_poll,
    a_restart_reuses_a_valid_cache_and_replaces_a_damaged_one,
    label_changes_from_two_replicas_at_once_both_land,
    a_labelled_version_is_not_deleted_and_a_delete_removes_it_everywhere,
    keys_that_are_not_a_version_are_skipped_and_bounds_hold,
    only_the_versions_the_policy_wants_are_downloaded,
    a_listing_that_fails_half_way_removes_nothing,
    a_delete_and_a_label_change_racing_never_leave_a_label_on_a_deleted_version,
    an_upload_under_way_cannot_be_deleted_but_an_abandoned_one_can,
    an_upload_over_files_copied_by_hand_is_refused_and_writes_nothing,
    a_labels_object_that_is_not_one_keeps_the_labels_and_refuses_changes,
);

#[test]
fn repository_urls_are_told_from_directories() {
    assert!(is_url("s3://bucket/prefix"));
    assert!(is_url("s3://bucket"));
    assert!(!is_url("repository"));
    assert!(!is_url("/srv/models"));
    assert!(!is_url("./a://b"));
    assert!(open_store("s3:///prefix").is_err());
    let err = open_store("ftp://x/y").err().unwrap().to_string();
    assert!(err.contains("s3://"), "{err}");
    #[cfg(not(feature = "gcs"))]
    {
        let err = open_store("gs://x/y").err().unwrap().to_string();
        assert!(err.contains("--features gcs"), "{err}");
    }
}

#[test]
fn the_default_cache_is_per_process_when_replicas_share_a_home() {
    let home = tempfile::tempdir().unwrap();
    // Only this test reads XDG_CACHE_HOME.
    std::env::set_var("XDG_CACHE_HOME", home.path());
    let (first, _l1) = default_cache_dir("s3://b/p").unwrap();
    let (second, l2) = default_cache_dir("s3://b/p").unwrap();
    assert_ne!(first, second, "a held cache is not shared");
    drop(l2);
    let (again, _l3) = default_cache_dir("s3://b/p").unwrap();
    assert_eq!(again, second, "a restart takes its slot back");
    assert!(first.starts_with(home.path()));
    let (other, _l4) = default_cache_dir("s3://b/q").unwrap();
    assert_ne!(other.parent(), None);
    assert_ne!(other, first);
}
