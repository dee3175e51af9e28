//! Dynamic batching for one loaded version: requests queue, and whenever the device is
//! free whatever is queued runs as one forward; what arrives meanwhile forms the next
//! batch. A lone request therefore runs at once, and batches grow with load.
//!
//! There is no batching thread. The caller that finds the device free becomes the
//! *leader*: it takes a batch from the queue (its own request first), runs the forward on
//! its own thread, hands every caller its rows, and then passes the lead to the oldest
//! request still queued (or frees the device when none is). A cross-thread hand-off would
//! cost more than a small model's forward (docs/design.md).
//!
//! Rows are copied once into the batch buffer at their offset and once out of the
//! outputs. Requests with more rows than `max_batch_size` are split and rejoined;
//! requests whose non-batch dimensions or dtypes differ from the batch being formed wait
//! for a later batch, unless the model pads variable-length inputs (`pad`). This module knows tensors and a forward function, nothing of HTTP,
//! Wasm or libtorch; it must not reach into `nn`, `plugin` or `backend` (it is handed a
//! [`Forward`]).
//!
//! Here: the parameters, the [`Batcher`] and its public calls. Beside it, `queue` (waiting
//! for rows or the lead), `lead` (forming, running and answering a batch) and `rows`
//! (split and join along dim 0).

mod lead;
mod pad;
mod queue;
mod rows;

pub use self::pad::{InputPad, Padding};

use self::queue::State;
use self::rows::{batch_rows, join_rows, slice_rows};
use crate::bundle::BatchingSpec;
use crate::metrics::VersionMetrics;
use crate::tensor::Tensor;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Named outputs of one forward, or what went wrong.
pub type Outputs = Result<Vec<(String, Tensor)>, BatchError>;

#[derive(Debug, Clone, PartialEq)]
pub enum BatchError {
    /// The queue holds `max_enqueued_batches` batches already (a 429).
    QueueFull(String),
    /// The input cannot be batched (no batch dimension) (a 400).
    BadInput(String),
    /// The forward failed; every caller of that batch gets the message (a 500).
    Model(String),
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::QueueFull(m) | BatchError::BadInput(m) | BatchError::Model(m) => {
                f.write_str(m)
            }
        }
    }
}

/// The batching parameters in effect (TF Serving's names).
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_batch_size: usize,
    pub batch_timeout: Duration,
    /// Increasing; empty means any size. A batch is padded up to the next one.
    pub allowed_batch_sizes: Vec<usize>,
    pub max_enqueued_batches: usize,
    pub num_batch_threads: usize,
    /// `pad_variable_length_inputs`: requests that differ only in free dimensions share
    /// a batch, padded (set by the runner, which knows the signature).
    pub padding: Option<Padding>,
}

impl From<&BatchingSpec> for Policy {
    fn from(s: &BatchingSpec) -> Policy {
        Policy {
            max_batch_size: s.max_batch_size.max(1) as usize,
            batch_timeout: Duration::from_micros(s.batch_timeout_micros),
            allowed_batch_sizes: s.allowed_batch_sizes.iter().map(|&b| b as usize).collect(),
            max_enqueued_batches: s.max_enqueued_batches.max(1) as usize,
            num_batch_threads: s.num_batch_threads.unwrap_or(1).max(1) as usize,
            padding: None,
        }
    }
}

impl Policy {
    /// The size a batch of `rows` is padded to.
    pub fn padded(&self, rows: usize) -> usize {
        self.allowed_batch_sizes
            .iter()
            .copied()
            .find(|&b| b >= rows)
            .unwrap_or(rows)
    }
}

/// Statistics of formed batches, for metrics and benchmarks.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub batches: u64,
    pub rows: u64,
    pub padded_rows: u64,
}

pub struct Batcher {
    policy: Policy,
    state: Mutex<State>,
    /// Woken when a request is queued, for a leader waiting to fill its batch
    /// (`batch_timeout_micros`).
    queued: tokio::sync::Notify,
    stats: Mutex<Stats>,
    metrics: VersionMetrics,
}

/// A forward over positional batch inputs.
pub trait Forward: Sync {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String>;
}

impl<F: Fn(Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> + Sync> Forward for F {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        self(inputs)
    }
}

impl Batcher {
    pub fn new(policy: Policy, metrics: VersionMetrics) -> Batcher {
        Batcher {
            policy,
            metrics,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued_rows: 0,
                leaders: 0,
                filling: 0,
            }),
            queued: tokio::sync::Notify::new(),
            stats: Mutex::new(Stats::default()),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap().clone()
    }

    /// Requests waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.state.lock().unwrap().queue.len()
    }

    /// Runs one request's rows through the batcher and returns its own outputs.
    pub async fn infer<F: Forward>(&self, inputs: Vec<Tensor>, forward: &F) -> Outputs {
        let rows = batch_rows(&inputs)?;
        let max = self.policy.max_batch_size;
        if rows <= max {
            return self.submit(inputs, rows, forward).await;
        }
        // Too many rows for one batch: split, run in turn, rejoin.
        let mut parts = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = max.min(rows - start);
            let chunk: Vec<Tensor> = inputs.iter().map(|t| slice_rows(t, start, n)).collect();
            parts.push(self.submit(chunk, n, forward).await?);
            start += n;
        }
        join_rows(parts)
    }
}

#[cfg(test)]
mod tests;
