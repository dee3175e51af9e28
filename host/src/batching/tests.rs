use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn policy(max: usize, allowed: &[usize], enqueued: usize) -> Policy {
    Policy {
        max_batch_size: max,
        batch_timeout: Duration::ZERO,
        allowed_batch_sizes: allowed.to_vec(),
        max_enqueued_batches: enqueued,
        num_batch_threads: 1,
        padding: None,
    }
}

fn rows(values: &[[f32; 2]]) -> Vec<Tensor> {
    let flat: Vec<f32> = values.iter().flatten().copied().collect();
    vec![Tensor::from_f32(vec![values.len() as i64, 2], &flat)]
}

/// y = 2x; the batch sizes it ran are recorded in `sizes`.
struct Doubler {
    sizes: Mutex<Vec<usize>>,
    delay: Duration,
    calls: AtomicUsize,
}

impl Doubler {
    fn new(delay_ms: u64) -> Arc<Doubler> {
        Arc::new(Doubler {
            sizes: Mutex::new(Vec::new()),
            delay: Duration::from_millis(delay_ms),
            calls: AtomicUsize::new(0),
        })
    }
}

impl Forward for Arc<Doubler> {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let x = &inputs[0];
        self.sizes.lock().unwrap().push(x.shape[0] as usize);
        let y: Vec<f32> = x.to_f64_vec().iter().map(|v| (v * 2.0) as f32).collect();
        Ok(vec![("y".into(), Tensor::from_f32(x.shape.clone(), &y))])
    }
}

fn values(out: &Outputs) -> Vec<f64> {
    out.as_ref().unwrap()[0].1.to_f64_vec()
}

#[tokio::test]
async fn a_lone_request_runs_at_once_as_a_batch_of_one() {
    let b = Batcher::new(policy(8, &[], 4), VersionMetrics::default());
    let f = Doubler::new(0);
    let out = b.infer(rows(&[[1.0, 2.0]]), &f).await;
    assert_eq!(values(&out), vec![2.0, 4.0]);
    assert_eq!(*f.sizes.lock().unwrap(), vec![1]);
}

#[tokio::test]
async fn batches_are_padded_to_an_allowed_size_and_trimmed_back() {
    let b = Batcher::new(policy(8, &[4, 8], 4), VersionMetrics::default());
    let f = Doubler::new(0);
    let out = b
        .infer(rows(&[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), &f)
        .await;
    assert_eq!(values(&out), vec![2.0, 2.0, 4.0, 4.0, 6.0, 6.0]);
    assert_eq!(out.unwrap()[0].1.shape, vec![3, 2]);
    assert_eq!(*f.sizes.lock().unwrap(), vec![4]);
}

#[tokio::test]
async fn a_request_larger_than_a_batch_is_split_and_rejoined() {
    let b = Batcher::new(policy(4, &[], 4), VersionMetrics::default());
    let f = Doubler::new(0);
    let input: Vec<[f32; 2]> = (0..10).map(|i| [i as f32, -(i as f32)]).collect();
    let out = b.infer(rows(&input), &f).await;
    let want: Vec<f64> = input.iter().flatten().map(|&v| v as f64 * 2.0).collect();
    assert_eq!(values(&out), want);
    assert_eq!(*f.sizes.lock().unwrap(), vec![4, 4, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_form_batches_and_each_gets_its_own_rows() {
    let b = Arc::new(Batcher::new(policy(16, &[], 64), VersionMetrics::default()));
    let f = Doubler::new(2);
    let mut handles = Vec::new();
    for i in 0..60 {
        let (b, f) = (b.clone(), f.clone());
        handles.push(tokio::spawn(async move {
            let n = 1 + i % 3;
            let input: Vec<[f32; 2]> = (0..n).map(|r| [i as f32, r as f32]).collect();
            let out = b.infer(rows(&input), &f).await;
            let want: Vec<f64> = input.iter().flatten().map(|&v| v as f64 * 2.0).collect();
            assert_eq!(values(&out), want, "request {i}");
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let sizes = f.sizes.lock().unwrap().clone();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        (0..60).map(|i| 1 + i % 3).sum::<usize>()
    );
    assert!(
        sizes.iter().any(|&s| s > 3),
        "no batch grew past one request: {sizes:?}"
    );
    assert!(sizes.iter().all(|&s| s <= 16));
    assert_eq!(
        b.state.lock().unwrap().leaders,
        0,
        "the device must be free again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shapes_that_differ_run_in_separate_batches() {
    let b = Arc::new(Batcher::new(policy(16, &[], 64), VersionMetrics::default()));
    let f = Doubler::new(2);
    let mut handles = Vec::new();
    for i in 0..20 {
        let (b, f) = (b.clone(), f.clone());
        handles.push(tokio::spawn(async move {
            let width = 2 + i % 2;
            let x = Tensor::from_f32(vec![1, width], &vec![i as f32; width as usize]);
            let out = b.infer(vec![x], &f).await.unwrap();
            assert_eq!(out[0].1.shape, vec![1, width]);
            assert!(out[0].1.to_f64_vec().iter().all(|&v| v == 2.0 * i as f64));
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_refuses_with_queue_full() {
    // The first forward is held until the queue has filled and a request was refused:
    // the order comes from the test, not from sleeps against a 50 ms forward.
    let b = Arc::new(Batcher::new(policy(1, &[], 2), VersionMetrics::default()));
    let f = Held::new();
    let refused = Arc::new(AtomicUsize::new(0));
    let (b1, f1) = (b.clone(), f.clone());
    let running = tokio::spawn(async move { b1.infer(rows(&[[1.0, 1.0]]), &f1).await });
    until("the first forward runs", || {
        f.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut handles = Vec::new();
    for _ in 0..7 {
        let (b, f, refused) = (b.clone(), f.clone(), refused.clone());
        handles.push(tokio::spawn(async move {
            let out = b.infer(rows(&[[2.0, 2.0]]), &f).await;
            if matches!(out, Err(BatchError::QueueFull(_))) {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            out
        }));
    }
    until("the queue is full and a request was refused", || {
        b.queue_depth() == 2 && refused.load(Ordering::SeqCst) >= 1
    })
    .await;
    f.release.add_permits(1);
    assert!(running.await.unwrap().is_ok());
    let mut full = 0;
    for h in handles {
        match h.await.unwrap() {
            Err(BatchError::QueueFull(m)) => {
                assert!(m.contains("queue is full"), "{m}");
                full += 1;
            }
            other => assert!(other.is_ok(), "{other:?}"),
        }
    }
    assert!(
        full >= 1,
        "8 requests into 1 running + 2 queued must overflow"
    );
    assert!(
        b.infer(rows(&[[2.0, 2.0]]), &f).await.is_ok(),
        "it serves again once drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_request_does_not_wedge_the_batcher() {
    // The test decides when the first forward ends (a Held forward), not a sleep: the 5 ms
    // sleeps this test used let the queued request run first on a loaded machine.
    let b = Arc::new(Batcher::new(policy(1, &[], 8), VersionMetrics::default()));
    let f = Held::new();
    let (b1, f1) = (b.clone(), f.clone());
    let running = tokio::spawn(async move { b1.infer(rows(&[[1.0, 1.0]]), &f1).await });
    until("the first forward runs", || {
        f.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let (b2, f2) = (b.clone(), f.clone());
    let queued = tokio::spawn(async move { b2.infer(rows(&[[2.0, 2.0]]), &f2).await });
    until("the second request waits", || b.queue_depth() == 1).await;
    queued.abort(); // its client went away while it waited
    assert!(queued.await.unwrap_err().is_cancelled());
    f.release.add_permits(1);
    assert!(running.await.unwrap().is_ok());
    let out = b.infer(rows(&[[3.0, 3.0]]), &f).await;
    assert_eq!(values(&out), vec![3.0, 3.0]);
    assert_eq!(
        f.entered.load(Ordering::SeqCst),
        2,
        "the cancelled request never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lead_sent_to_a_request_whose_client_just_left_is_passed_on() {
    // The race that wedged the batcher: the leader passes the lead to a queued request
    // whose future is dropped before it is polled again.
    struct Gated {
        entered: std::sync::mpsc::SyncSender<()>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }
    impl Forward for Arc<Gated> {
        fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
            if inputs[0].to_f64_vec()[0] == 1.0 {
                self.entered.send(()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
            }
            Ok(vec![("y".into(), inputs[0].clone())])
        }
    }
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
    let (release_tx, release) = std::sync::mpsc::channel();
    let f = Arc::new(Gated {
        entered: entered_tx,
        release: Mutex::new(release),
    });
    let b = Arc::new(Batcher::new(policy(1, &[], 8), VersionMetrics::default()));
    let (b1, f1) = (b.clone(), f.clone());
    let leader = tokio::spawn(async move { b1.infer(rows(&[[1.0, 1.0]]), &f1).await });
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    // A second request queues behind the running forward...
    let mut queued = Box::pin(b.infer(rows(&[[2.0, 2.0]]), &f));
    assert!(
        tokio::time::timeout(Duration::from_millis(20), &mut queued)
            .await
            .is_err(),
        "it waits behind the running forward"
    );
    // ...the leader finishes and passes it the lead, and its client goes away before
    // it is polled again.
    release_tx.send(()).unwrap();
    assert!(leader.await.unwrap().is_ok());
    drop(queued);
    let next = tokio::time::timeout(Duration::from_secs(5), b.infer(rows(&[[3.0, 3.0]]), &f))
        .await
        .expect("the batcher runs the next request instead of waiting for a lost lead");
    assert_eq!(values(&next), vec![3.0, 3.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_forward_fails_only_its_batch() {
    struct FailOnNegative;
    impl Forward for FailOnNegative {
        fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
            std::thread::sleep(Duration::from_millis(5));
            if inputs[0].to_f64_vec().iter().any(|&v| v < 0.0) {
                return Err("negative input".into());
            }
            Ok(vec![("y".into(), inputs[0].clone())])
        }
    }
    let b = Batcher::new(policy(1, &[], 8), VersionMetrics::default());
    let bad = b.infer(rows(&[[-1.0, 0.0]]), &FailOnNegative).await;
    assert_eq!(bad.unwrap_err(), BatchError::Model("negative input".into()));
    assert!(b.infer(rows(&[[1.0, 0.0]]), &FailOnNegative).await.is_ok());
}

/// A forward that holds its batch until the test releases it (values of 1.0 only),
/// fails on a negative value, and records the batch sizes it ran.
struct Held {
    entered: AtomicUsize,
    release: tokio::sync::Semaphore,
    sizes: Mutex<Vec<usize>>,
}

impl Held {
    fn new() -> Arc<Held> {
        Arc::new(Held {
            entered: AtomicUsize::new(0),
            release: tokio::sync::Semaphore::new(0),
            sizes: Mutex::new(Vec::new()),
        })
    }
}

impl Forward for Arc<Held> {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        let v = inputs[0].to_f64_vec();
        self.sizes.lock().unwrap().push(inputs[0].shape[0] as usize);
        self.entered.fetch_add(1, Ordering::SeqCst);
        if v[0] == 1.0 {
            // A blocking wait on a tokio semaphore: forwards run on their own thread.
            while self.release.try_acquire().is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if v.iter().any(|&x| x < 0.0) {
            return Err("negative input".into());
        }
        Ok(vec![("y".into(), inputs[0].clone())])
    }
}

/// Polls `cond` every millisecond for up to 10 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_request_frees_its_place_in_the_queue_at_once() {
    // Room for one queued row: the cancelled request must not keep it.
    let b = Arc::new(Batcher::new(policy(1, &[], 1), VersionMetrics::default()));
    let f = Held::new();
    let (b1, f1) = (b.clone(), f.clone());
    let running = tokio::spawn(async move { b1.infer(rows(&[[1.0, 1.0]]), &f1).await });
    until("the first forward runs", || {
        f.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let (b2, f2) = (b.clone(), f.clone());
    let queued = tokio::spawn(async move { b2.infer(rows(&[[2.0, 2.0]]), &f2).await });
    until("the second request queues", || b.queue_depth() == 1).await;
    queued.abort();
    assert!(queued.await.unwrap_err().is_cancelled());
    assert_eq!(b.queue_depth(), 0);
    // The first forward still holds the model: this one is queued, not refused.
    let (b3, f3) = (b.clone(), f.clone());
    let third = tokio::spawn(async move { b3.infer(rows(&[[3.0, 3.0]]), &f3).await });
    until("the third request queues", || b.queue_depth() == 1).await;
    f.release.add_permits(1);
    assert!(running.await.unwrap().is_ok());
    assert_eq!(values(&third.await.unwrap()), vec![3.0, 3.0]);
    assert_eq!(
        *f.sizes.lock().unwrap(),
        vec![1, 1],
        "the cancelled request never ran"
    );
}

/// Four one-row requests, 5 ms apart, into batches of four with a 30 s timeout and
/// `slots` forward slots: they must run as one batch of four within 10 s.
async fn four_rows_fill_one_batch(slots: usize, why: &str) -> Arc<Batcher> {
    let mut p = policy(4, &[], 4);
    p.batch_timeout = Duration::from_secs(30);
    p.num_batch_threads = slots;
    let b = Arc::new(Batcher::new(p, VersionMetrics::default()));
    let f = Doubler::new(0);
    let all = async {
        let mut handles = Vec::new();
        for i in 0..4 {
            let (b, f) = (b.clone(), f.clone());
            handles.push(tokio::spawn(async move {
                b.infer(rows(&[[i as f32, 0.0]]), &f).await
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(values(&h.await.unwrap()), vec![2.0 * i as f64, 0.0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect(why);
    assert_eq!(*f.sizes.lock().unwrap(), vec![4]);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_timeout_ends_as_soon_as_the_batch_is_full() {
    four_rows_fill_one_batch(
        1,
        "the leader's own row and three queued fill the batch: no 30 s wait",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_several_slots_requests_fill_the_waiting_batch_instead_of_each_waiting() {
    // Two forward slots and a long timeout: the first request waits to fill its
    // batch, and the next three must join it, not take the free slot and wait 30 s
    // for a batch of their own.
    let b = four_rows_fill_one_batch(2, "four rows fill one batch of four: no 30 s wait").await;
    let st = b.state.lock().unwrap();
    assert_eq!((st.leaders, st.filling), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lead_passed_to_queued_requests_runs_them_without_the_batch_timeout() {
    // The timeout is the extra wait of an idle device only: when a batch finishes,
    // what queued meanwhile runs at once.
    let mut p = policy(2, &[], 4);
    p.batch_timeout = Duration::from_secs(30);
    let b = Arc::new(Batcher::new(p, VersionMetrics::default()));
    let f = Held::new();
    let (b1, f1) = (b.clone(), f.clone());
    // Two rows fill the batch: it runs at once, and holds the model.
    let first = tokio::spawn(async move { b1.infer(rows(&[[1.0, 1.0], [1.0, 1.0]]), &f1).await });
    until("the first forward runs", || {
        f.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let (b2, f2) = (b.clone(), f.clone());
    let queued = tokio::spawn(async move { b2.infer(rows(&[[2.0, 2.0]]), &f2).await });
    until("the second request queues", || b.queue_depth() == 1).await;
    f.release.add_permits(1);
    assert!(first.await.unwrap().is_ok());
    let out = tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("the queued request runs when the device frees, not 30 s later")
        .unwrap();
    assert_eq!(values(&out), vec![2.0, 2.0]);
    assert_eq!(*f.sizes.lock().unwrap(), vec![2, 1]);
}

#[test]
fn split_parts_whose_outputs_differ_are_refused_not_joined() {
    let part = |rows: i64, width: i64| {
        vec![(
            "y".to_string(),
            Tensor::from_f32(vec![rows, width], &vec![0.0; (rows * width) as usize]),
        )]
    };
    let joined = join_rows(vec![part(4, 3), part(2, 3)]).unwrap();
    assert_eq!(joined[0].1.shape, vec![6, 3]);
    assert_eq!(joined[0].1.data.len(), 6 * 3 * 4);
    let err = join_rows(vec![part(4, 10), part(2, 7)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("y [4, 10] and y [2, 7]"), "{err}");
    assert!(err.contains("max_batch_size"), "{err}");
}

#[tokio::test]
async fn a_lone_request_waits_the_batch_timeout_and_then_runs() {
    let mut p = policy(4, &[], 4);
    p.batch_timeout = Duration::from_millis(30);
    let b = Batcher::new(p, VersionMetrics::default());
    let f = Doubler::new(0);
    let started = Instant::now();
    let out = b.infer(rows(&[[1.0, 2.0]]), &f).await;
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(values(&out), vec![2.0, 4.0]);
    assert_eq!(*f.sizes.lock().unwrap(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_forward_fails_every_caller_of_its_batch_and_no_other() {
    let f = Held::new();
    let b = Arc::new(Batcher::new(policy(4, &[], 4), VersionMetrics::default()));
    let spawn = |v: f32| {
        let (b, f) = (b.clone(), f.clone());
        tokio::spawn(async move { b.infer(rows(&[[v, 0.0]]), &f).await })
    };
    let first = spawn(1.0);
    until("the first forward runs", || {
        f.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    // Queued behind the first forward, these three run as one batch, which fails.
    let mut batch = Vec::new();
    for (i, v) in [2.0, -1.0, 3.0].into_iter().enumerate() {
        batch.push(spawn(v));
        until("it queues", || b.queue_depth() == i + 1).await;
    }
    f.release.add_permits(1);
    assert!(first.await.unwrap().is_ok());
    for h in batch {
        let err = h.await.unwrap().unwrap_err();
        assert_eq!(err, BatchError::Model("negative input".into()));
    }
    assert_eq!(*f.sizes.lock().unwrap(), vec![1, 3]);
    assert!(spawn(4.0).await.unwrap().is_ok(), "the next batch runs");
}

#[test]
fn requests_need_a_batch_dimension_that_agrees() {
    let scalar = vec![Tensor::from_f32(vec![], &[1.0])];
    assert!(matches!(batch_rows(&scalar), Err(BatchError::BadInput(_))));
    let a = Tensor::from_f32(vec![2, 1], &[1.0, 2.0]);
    let b = Tensor::from_f32(vec![3, 1], &[1.0, 2.0, 3.0]);
    let err = batch_rows(&[a, b]).unwrap_err().to_string();
    assert!(err.contains("2 and 3 rows"), "{err}");
}

/// Token ids and a mask of `len` tokens each, for `n` rows: ids are `base + t`.
fn tokens(n: usize, len: usize, base: i64) -> Vec<Tensor> {
    let ids: Vec<i64> = (0..n)
        .flat_map(|r| (0..len).map(move |t| base + (r * 100 + t) as i64))
        .collect();
    let shape = vec![n as i64, len as i64];
    vec![
        Tensor::from_i64(shape.clone(), &ids),
        Tensor::from_i64(shape, &vec![1i64; n * len]),
    ]
}

/// Per token, `2 * id` (shape [B, L]); per row, the sum of the ids its mask covers
/// (shape [B]): a padded token must change neither. Records each batch's shape.
struct Encoder {
    shapes: Mutex<Vec<Vec<i64>>>,
    delay: Duration,
}

impl Forward for Arc<Encoder> {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        std::thread::sleep(self.delay);
        let (ids, mask) = (inputs[0].to_f64_vec(), inputs[1].to_f64_vec());
        let shape = inputs[0].shape.clone();
        self.shapes.lock().unwrap().push(shape.clone());
        let len = shape[1] as usize;
        let doubled: Vec<f32> = ids.iter().map(|v| (v * 2.0) as f32).collect();
        let sums: Vec<f32> = ids
            .chunks(len.max(1))
            .zip(mask.chunks(len.max(1)))
            .map(|(i, m)| i.iter().zip(m).map(|(a, b)| a * b).sum::<f64>() as f32)
            .collect();
        Ok(vec![
            ("tokens".into(), Tensor::from_f32(shape.clone(), &doubled)),
            ("pooled".into(), Tensor::from_f32(vec![shape[0]], &sums)),
        ])
    }
}

fn padded_policy(max: usize) -> Policy {
    Policy {
        padding: Some(Padding {
            inputs: vec![
                InputPad {
                    free: vec![false, true],
                    value: 0.0,
                },
                InputPad {
                    free: vec![false, true],
                    value: 0.0,
                },
            ],
            outputs: vec![
                ("tokens".into(), vec![false, true]),
                ("pooled".into(), vec![false]),
            ],
        }),
        ..policy(max, &[], 64)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_of_different_lengths_share_a_batch_and_get_their_own_answers() {
    let b = Arc::new(Batcher::new(padded_policy(32), VersionMetrics::default()));
    let f = Arc::new(Encoder {
        shapes: Mutex::new(Vec::new()),
        delay: Duration::from_millis(20),
    });
    // Alone, each request's answer is what the forward gives on its unpadded rows.
    let alone = |n: usize, len: usize, base: i64| {
        let out = Arc::new(Encoder {
            shapes: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
        })
        .forward(tokens(n, len, base))
        .unwrap();
        out
    };
    let mut handles = Vec::new();
    for i in 0..12usize {
        let (b, f) = (b.clone(), f.clone());
        let (n, len, base) = (1 + i % 3, 1 + (i * 7) % 11, 1000 * i as i64);
        let want = alone(n, len, base);
        handles.push(tokio::spawn(async move {
            let out = b.infer(tokens(n, len, base), &f).await.unwrap();
            for ((name, got), (_, want)) in out.iter().zip(&want) {
                assert_eq!(got.shape, want.shape, "request {i}: {name}");
                assert_eq!(got.to_f64_vec(), want.to_f64_vec(), "request {i}: {name}");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let shapes = f.shapes.lock().unwrap().clone();
    // The first request ran alone while the other eleven queued; they then shared fewer
    // batches than requests, padded to their longest.
    assert!(
        shapes.len() < 12,
        "no two requests shared a batch: {shapes:?}"
    );
    let rows: i64 = shapes.iter().map(|s| s[0]).sum();
    assert_eq!(rows, (0..12).map(|i| 1 + i as i64 % 3).sum::<i64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_padding_or_in_a_fixed_dimension_different_shapes_never_share() {
    // Declared fixed ([-1, 2] against [-1, 3]): never merged, even with padding on.
    let padding = Padding {
        inputs: vec![InputPad {
            free: vec![false, false],
            value: 0.0,
        }],
        outputs: vec![],
    };
    let a = vec![Tensor::from_f32(vec![1, 2], &[1.0, 2.0])];
    let c = vec![Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0])];
    assert!(!padding.compatible(&a, &c));
    assert!(padded_policy(8)
        .padding
        .unwrap()
        .compatible(&tokens(1, 2, 0), &tokens(3, 9, 0)));
    // And a different dtype never merges.
    let mut floats = tokens(1, 2, 0);
    floats[1] = Tensor::from_f32(vec![1, 2], &[1.0, 1.0]);
    assert!(!padded_policy(8)
        .padding
        .unwrap()
        .compatible(&tokens(1, 2, 0), &floats));
}

#[test]
fn resize_pads_with_the_value_and_cuts_back_in_any_dimension() {
    // [2, 2, 3] -> [2, 3, 4], padded with 9, then cut back.
    let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let t = Tensor::from_f32(vec![2, 2, 3], &src);
    let grown = super::pad::resize(&t, &[2, 3, 4], &9f32.to_le_bytes());
    let g = grown.to_f64_vec();
    assert_eq!(grown.shape, vec![2, 3, 4]);
    assert_eq!(&g[0..4], &[0.0, 1.0, 2.0, 9.0]);
    assert_eq!(&g[4..8], &[3.0, 4.0, 5.0, 9.0]);
    assert_eq!(&g[8..12], &[9.0; 4]);
    assert_eq!(&g[12..16], &[6.0, 7.0, 8.0, 9.0]);
    let back = super::pad::resize(&grown, &[2, 2, 3], &[]);
    assert_eq!(back, t);
}

#[test]
fn one_long_sequence_does_not_pad_many_short_ones_up_to_its_length() {
    use super::pad::{PadBudget, PAD_FLOOR};
    // A leader of 10,000 tokens (160 KB of ids and mask): short requests join only while
    // the padded batch stays within 4x the bytes held, or the 1 MiB floor.
    let mut budget = PadBudget::new(&tokens(1, 10_000, 0));
    let joined = (0..32)
        .take_while(|_| budget.admits(&tokens(1, 1, 0)))
        .count();
    let per_row = 10_000 * 8 * 2;
    assert_eq!(
        joined,
        (PAD_FLOOR as usize / per_row) - 1,
        "{joined} joined"
    );
    // Requests of one length never pad: any number joins.
    let mut budget = PadBudget::new(&tokens(1, 10_000, 0));
    assert!((0..31).all(|_| budget.admits(&tokens(1, 10_000, 0))));
}
