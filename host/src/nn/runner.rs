//! The per-version [`Runner`]: the execution path that the tensor APIs and wasi-nn share.
//! It checks and orders the inputs against the model's signature, bounds the forwards at
//! once (a gate's permits, or the batcher's `num_batch_threads`), queues through the
//! [`Batcher`] when the version batches, and runs the forward inline or in
//! `block_in_place` by its moving average.
//!
//! It knows nothing of Wasm: the wasi-nn resources over it are `wasi`'s.

use crate::backend::{Model, Threading};
use crate::batching::{BatchError, Batcher, Policy};
use crate::bundle::{BatchingSpec, TensorSpec};
use crate::metrics::VersionMetrics;
use crate::tensor::{check_shape, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Forwards whose moving average is above this run in `block_in_place`.
pub const INLINE_LIMIT: Duration = Duration::from_micros(200);

/// Without batching, this many requests per forward slot may wait for a version's
/// forward; one more is refused as overload (429 with `Retry-After`), as a full batching
/// queue is. It matches `max_enqueued_batches`' default of 64 batches, here of one
/// request each: memory stays bounded however many clients connect.
pub const WAITING_PER_SLOT: usize = 64;

/// Why an inference failed: the caller's input, or the model.
#[derive(Debug, Clone, PartialEq)]
pub enum InferError {
    /// The inputs do not match the model's signature (a 400).
    BadInput(String),
    /// The forward failed (a 500).
    Model(String),
    /// The version's queue is full (a 429 with Retry-After).
    Overloaded(String),
}

impl std::fmt::Display for InferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InferError::BadInput(m) | InferError::Model(m) | InferError::Overloaded(m) => {
                f.write_str(m)
            }
        }
    }
}

/// The execution path of one loaded model version.
pub struct Runner {
    model: Arc<dyn Model>,
    inputs: Vec<TensorSpec>,
    /// Without batching: `concurrency` forwards at a time per version.
    gate: tokio::sync::Semaphore,
    /// Without batching: requests waiting for the gate now.
    waiting: std::sync::atomic::AtomicUsize,
    /// With `[batching]`: the dynamic batcher.
    batcher: Option<Batcher>,
    /// Exponential moving average of the forward time, nanoseconds.
    avg_forward_ns: AtomicU64,
    metrics: VersionMetrics,
    /// Forwards at once and intra-op threads, as chosen at load.
    threading: Threading,
}

impl Runner {
    /// Whether the version has no model (a model-less handler bundle).
    pub fn model_less(&self) -> bool {
        self.model.is_none()
    }

    pub fn new(
        model: Arc<dyn Model>,
        inputs: Vec<TensorSpec>,
        outputs: &[TensorSpec],
        batching: Option<&BatchingSpec>,
        metrics: VersionMetrics,
        threading: Threading,
    ) -> Runner {
        let concurrency = threading.concurrency.max(1);
        model.set_threads(threading.intra_op);
        let batcher = batching.map(|b| {
            let policy = Policy {
                num_batch_threads: concurrency,
                padding: b
                    .pad_variable_length_inputs
                    .then(|| padding(&inputs, outputs, &b.pad_values)),
                ..Policy::from(b)
            };
            Batcher::new(policy, metrics.clone())
        });
        Runner {
            threading,
            model,
            inputs,
            gate: tokio::sync::Semaphore::new(concurrency),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            batcher,
            avg_forward_ns: AtomicU64::new(0),
            metrics,
        }
    }

    /// Starts the forward-time average from a measurement (the warm-up's).
    pub fn seed_forward_time(&self, t: Duration) {
        self.avg_forward_ns
            .store(t.as_nanos().max(1) as u64, Ordering::Relaxed);
    }

    /// The batcher's statistics, when the version batches.
    pub fn batch_stats(&self) -> Option<crate::batching::Stats> {
        self.batcher.as_ref().map(Batcher::stats)
    }

    pub fn device(&self) -> String {
        self.model.device()
    }

    /// Forwards at once and intra-op threads, as chosen at load.
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// Whether the version batches.
    pub fn batches(&self) -> bool {
        self.batcher.is_some()
    }

    /// The version's metric handles.
    pub fn metrics(&self) -> &VersionMetrics {
        &self.metrics
    }

    /// Requests waiting for this version's forward (the batcher's queue; without
    /// batching, those waiting for a forward slot).
    pub fn queue_depth(&self) -> usize {
        match &self.batcher {
            Some(b) => b.queue_depth(),
            None => self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Orders named inputs as the model takes them and checks names, dtypes and shapes.
    /// A model without declared inputs takes them in the order given.
    pub fn arrange(&self, mut named: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, InferError> {
        if self.inputs.is_empty() {
            return Ok(named.into_iter().map(|(_, t)| t).collect());
        }
        let expected: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
        if let Some((unknown, _)) = named.iter().find(|(n, _)| !expected.contains(&n.as_str())) {
            return Err(InferError::BadInput(format!(
                "unknown input '{}'; the model's inputs are {expected:?}",
                crate::names::bounded(unknown)
            )));
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let pos = named
                .iter()
                .position(|(n, _)| *n == spec.name)
                .ok_or_else(|| {
                    InferError::BadInput(format!(
                        "missing input '{}'; the model's inputs are {expected:?}",
                        spec.name
                    ))
                })?;
            let (_, t) = named.swap_remove(pos);
            if t.dtype != spec.dtype {
                return Err(InferError::BadInput(format!(
                    "input '{}' has dtype {} but the model expects {}",
                    spec.name, t.dtype, spec.dtype
                )));
            }
            check_shape(&spec.name, &spec.shape, &t.shape).map_err(InferError::BadInput)?;
            ordered.push(t);
        }
        Ok(ordered)
    }

    /// Checks and runs one inference with named inputs.
    pub async fn infer(
        &self,
        named: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, InferError> {
        let inputs = self.arrange(named)?;
        self.forward(inputs).await
    }

    /// Runs one forward on positional inputs that already passed [`Runner::arrange`]:
    /// through the batcher when the version batches, else alone behind the gate.
    pub async fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, InferError> {
        if let Some(batcher) = &self.batcher {
            return batcher
                .infer(inputs, &|batch: Vec<Tensor>| self.run_model(batch))
                .await
                .map_err(|e| match e {
                    BatchError::QueueFull(m) => InferError::Overloaded(m),
                    BatchError::BadInput(m) => InferError::BadInput(m),
                    BatchError::Model(m) => InferError::Model(m),
                });
        }
        let unloading = |_| InferError::Model("the model is being unloaded".into());
        let _turn = match self.gate.try_acquire() {
            Ok(turn) => {
                self.metrics.observe_queue(Duration::ZERO);
                turn
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(unloading(())),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let limit = WAITING_PER_SLOT * self.threading.concurrency.max(1);
                let _wait = Wait::enter(self, limit)?;
                let since = Instant::now();
                let turn = self.gate.acquire().await.map_err(|_| unloading(()))?;
                self.metrics.observe_queue(since.elapsed());
                turn
            }
        };
        self.run_model(inputs).map_err(InferError::Model)
    }

    /// The forward itself, from the calling thread: inline when forwards have been quick,
    /// inside `block_in_place` when they have been slow (module doc).
    fn run_model(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        let slow = self.avg_forward_ns.load(Ordering::Relaxed) > INLINE_LIMIT.as_nanos() as u64;
        let started = Instant::now();
        let result = if slow {
            tokio::task::block_in_place(|| self.model.forward(inputs))
        } else {
            self.model.forward(inputs)
        };
        let elapsed = started.elapsed();
        self.metrics.observe_compute(elapsed);
        let took = elapsed.as_nanos() as u64;
        let avg = self.avg_forward_ns.load(Ordering::Relaxed);
        let next = if avg == 0 { took } else { (avg * 7 + took) / 8 };
        self.avg_forward_ns.store(next, Ordering::Relaxed);
        result
    }
}

/// A request waiting for a forward slot (no batching): counted in `waiting` and the
/// queue-depth gauge until it gets its turn or its client goes away.
struct Wait<'a> {
    runner: &'a Runner,
}

impl<'a> Wait<'a> {
    fn enter(runner: &'a Runner, limit: usize) -> Result<Wait<'a>, InferError> {
        // Counted only when admitted, so refusals in flight do not crowd out the next one.
        runner
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|n| {
                InferError::Overloaded(format!(
                    "the model is overloaded ({n} requests waiting for its forward, \
                     {WAITING_PER_SLOT} per forward slot without [batching]); retry shortly"
                ))
            })?;
        runner.metrics.queue_step(true);
        Ok(Wait { runner })
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        self.runner.waiting.fetch_sub(1, Ordering::Relaxed);
        self.runner.metrics.queue_step(false);
    }
}

/// Which dimensions of each input may differ between requests of one batch (those
/// declared `-1` past the batch dimension), the value they are padded with
/// (`pad_values`, default 0), and the outputs' free dimensions, cut back per request.
fn padding(
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    values: &std::collections::BTreeMap<String, f64>,
) -> crate::batching::Padding {
    let free = |shape: &[i64]| -> Vec<bool> {
        shape
            .iter()
            .enumerate()
            .map(|(d, &s)| d > 0 && s < 0)
            .collect()
    };
    crate::batching::Padding {
        inputs: inputs
            .iter()
            .map(|t| crate::batching::InputPad {
                free: free(&t.shape),
                value: values.get(&t.name).copied().unwrap_or(0.0),
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|t| (t.name.clone(), free(&t.shape)))
            .collect(),
    }
}
