use super::wasi::to_wasi_tensor;
use super::*;
use crate::backend::{IntraOp, Model, Threading};
use crate::bundle::{BatchingSpec, TensorSpec};
use crate::metrics::VersionMetrics;
use crate::tensor::{DType, Tensor};
use crate::wit::wasi::nn as gen;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Echo;
impl Model for Echo {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        Ok(inputs.into_iter().map(|t| ("out".to_string(), t)).collect())
    }
    fn device(&self) -> String {
        "cpu".into()
    }
}

fn spec(name: &str, dtype: DType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// A model that sleeps in its forward and records the most forwards at once.
#[derive(Default)]
struct Slow {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl Model for Slow {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(inputs.into_iter().map(|t| ("out".to_string(), t)).collect())
    }
    fn device(&self) -> String {
        "cpu".into()
    }
}

/// Most forwards at once when 6 callers infer together on a runner of `concurrency`.
async fn most_at_once(batching: Option<&BatchingSpec>, concurrency: usize) -> usize {
    let model = Arc::new(Slow::default());
    let r = Arc::new(Runner::new(
        model.clone(),
        vec![spec("x", DType::Fp32, &[-1, 1])],
        &[],
        batching,
        VersionMetrics::default(),
        Threading {
            concurrency,
            intra_op: IntraOp::Shared,
        },
    ));
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move {
                let x = Tensor::from_f32(vec![1, 1], &[i as f32]);
                r.infer(vec![("x".into(), x)]).await.unwrap()
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    model.most.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_bounds_the_forwards_at_once_with_and_without_batching() {
    assert_eq!(most_at_once(None, 1).await, 1);
    assert_eq!(most_at_once(None, 2).await, 2);
    let batching = BatchingSpec {
        max_batch_size: 1,
        batch_timeout_micros: 0,
        allowed_batch_sizes: vec![],
        max_enqueued_batches: 64,
        num_batch_threads: None,
        pad_variable_length_inputs: false,
        pad_values: Default::default(),
    };
    assert_eq!(most_at_once(Some(&batching), 1).await, 1);
    assert_eq!(most_at_once(Some(&batching), 2).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_batching_the_wait_for_a_forward_is_bounded_and_counted() {
    /// Holds its forward slot on a 0 until released, answers at once otherwise.
    #[derive(Default)]
    struct FirstHeld {
        entered: std::sync::atomic::AtomicBool,
        release: std::sync::atomic::AtomicBool,
    }
    impl Model for FirstHeld {
        fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
            if inputs[0].to_f64_vec()[0] == 0.0 {
                self.entered.store(true, Ordering::SeqCst);
                while !self.release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(inputs.into_iter().map(|t| ("out".to_string(), t)).collect())
        }
        fn device(&self) -> String {
            "cpu".into()
        }
    }
    let model = Arc::new(FirstHeld::default());
    let r = Arc::new(Runner::new(
        model.clone(),
        vec![spec("x", DType::Fp32, &[-1, 1])],
        &[],
        None,
        VersionMetrics::default(),
        Threading {
            concurrency: 1,
            intra_op: IntraOp::Shared,
        },
    ));
    let call = |v: f32| {
        let r = r.clone();
        tokio::spawn(async move {
            let x = Tensor::from_f32(vec![1, 1], &[v]);
            r.infer(vec![("x".into(), x)]).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = call(0.0);
    while !model.entered.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the first forward never ran");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The first forward holds the slot until released: 64 wait, 2 are refused.
    let rest: Vec<_> = (0..WAITING_PER_SLOT + 2).map(|_| call(1.0)).collect();
    while r.queue_depth() < WAITING_PER_SLOT || rest.iter().filter(|c| c.is_finished()).count() < 2
    {
        assert!(Instant::now() < deadline, "the calls never settled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        r.queue_depth(),
        WAITING_PER_SLOT,
        "waiting requests are counted"
    );
    model.release.store(true, Ordering::SeqCst);
    assert!(first.await.unwrap().is_ok());
    let mut refused = 0;
    for c in rest {
        match c.await.unwrap() {
            Ok(_) => {}
            Err(InferError::Overloaded(m)) => {
                assert!(m.contains("without [batching]"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        refused, 2,
        "the two beyond {WAITING_PER_SLOT} waiting are refused"
    );
    assert_eq!(r.queue_depth(), 0);
}

#[test]
fn arrange_orders_by_signature_and_names_problems() {
    let r = Runner::new(
        Arc::new(Echo),
        vec![
            spec("a", DType::Fp32, &[-1, 2]),
            spec("b", DType::Int64, &[-1]),
        ],
        &[],
        None,
        VersionMetrics::default(),
        Threading {
            concurrency: 1,
            intra_op: IntraOp::Fixed(1),
        },
    );
    let a = Tensor::from_f32(vec![1, 2], &[1.0, 2.0]);
    let b = Tensor::new(DType::Int64, vec![1], vec![0; 8]).unwrap();
    let got = r
        .arrange(vec![("b".into(), b.clone()), ("a".into(), a.clone())])
        .unwrap();
    assert_eq!(got, vec![a.clone(), b.clone()]);

    let err = r.arrange(vec![("a".into(), a.clone())]).unwrap_err();
    assert_eq!(
        err,
        InferError::BadInput("missing input 'b'; the model's inputs are [\"a\", \"b\"]".into())
    );
    let err = r.arrange(vec![("c".into(), a.clone())]).unwrap_err();
    assert!(err.to_string().contains("unknown input 'c'"));
    let err = r
        .arrange(vec![("a".into(), b.clone()), ("b".into(), b.clone())])
        .unwrap_err();
    assert!(err
        .to_string()
        .contains("input 'a' has dtype int64 but the model expects fp32"));
    let wide = Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]);
    let err = r
        .arrange(vec![("a".into(), wide), ("b".into(), b)])
        .unwrap_err();
    assert!(err.to_string().contains("has shape [1, 3]"), "{err}");
}

#[test]
fn outputs_wasi_cannot_name_are_widened() {
    let t = Tensor::new(
        DType::Int16,
        vec![2],
        [(-7i16).to_le_bytes(), 9i16.to_le_bytes()].concat(),
    )
    .unwrap();
    let w = to_wasi_tensor(t);
    assert_eq!(w.ty, gen::tensor::TensorType::I32);
    assert_eq!(w.data, [(-7i32).to_le_bytes(), 9i32.to_le_bytes()].concat());
}
