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
//! for a later batch. This module knows tensors and a forward function, nothing of HTTP,
//! Wasm or libtorch.

use crate::bundle::BatchingSpec;
use crate::metrics::VersionMetrics;
use crate::tensor::Tensor;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
}

impl From<&BatchingSpec> for Policy {
    fn from(s: &BatchingSpec) -> Policy {
        Policy {
            max_batch_size: s.max_batch_size.max(1) as usize,
            batch_timeout: Duration::from_micros(s.batch_timeout_micros),
            allowed_batch_sizes: s.allowed_batch_sizes.iter().map(|&b| b as usize).collect(),
            max_enqueued_batches: s.max_enqueued_batches.max(1) as usize,
            num_batch_threads: s.num_batch_threads.unwrap_or(1).max(1) as usize,
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

/// What a queued request is told: its outputs, or that it now leads (with its own
/// inputs handed back, since it left the queue).
enum Msg {
    Done(Outputs),
    Lead(Vec<Tensor>, usize, Instant),
}

struct Task {
    inputs: Vec<Tensor>,
    rows: usize,
    queued_at: Instant,
    tx: oneshot::Sender<Msg>,
}

struct State {
    queue: VecDeque<Task>,
    queued_rows: usize,
    /// Leaders running now (at most `num_batch_threads`).
    leaders: usize,
    /// Leaders waiting to fill their batch (`batch_timeout_micros`): at most one. While
    /// one waits, new requests queue for it instead of taking another free slot.
    filling: usize,
}

/// A queued request's wait for its answer or the lead. A leader may send the lead in the
/// instant between the caller going away and the task leaving the queue: the send
/// succeeds, nobody receives it, and with the lead lost the version would never run
/// another batch (`wrk` stopping 64 connections at once did it within a few rounds). So
/// a wait dropped before it got its message closes the channel and passes on a lead
/// that arrived.
struct Waiting<'a> {
    batcher: &'a Batcher,
    rx: Option<oneshot::Receiver<Msg>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Msg::Lead(..)) = rx.try_recv() {
                self.batcher.pass_lead();
            }
            // The request leaves the queue now, not when a leader next looks: rows of
            // callers that are gone must not fill the queue and turn others away (429).
            self.batcher.drop_cancelled();
        }
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

    async fn submit<F: Forward>(&self, inputs: Vec<Tensor>, rows: usize, forward: &F) -> Outputs {
        let queued = {
            let mut st = self.state.lock().unwrap();
            if st.leaders < self.policy.num_batch_threads && st.filling == 0 {
                // The device is free: lead at once, no queueing, no hand-off. With a
                // batch timeout, an idle device may wait to fill this batch; while it
                // does, the requests that arrive queue for it (the branch below) rather
                // than each taking a free slot and waiting on its own.
                st.leaders += 1;
                let fill =
                    !self.policy.batch_timeout.is_zero() && rows < self.policy.max_batch_size;
                if fill {
                    st.filling += 1;
                }
                Ok((inputs, fill))
            } else {
                let limit = self.policy.max_enqueued_batches * self.policy.max_batch_size;
                if st.queued_rows + rows > limit {
                    return Err(BatchError::QueueFull(format!(
                        "the model's queue is full ({} rows waiting, max_enqueued_batches = {}); retry shortly",
                        st.queued_rows, self.policy.max_enqueued_batches
                    )));
                }
                let (tx, rx) = oneshot::channel();
                st.queue.push_back(Task {
                    inputs,
                    rows,
                    queued_at: Instant::now(),
                    tx,
                });
                st.queued_rows += rows;
                self.metrics.set_queue_depth(st.queue.len());
                if !self.policy.batch_timeout.is_zero() {
                    self.queued.notify_waiters();
                }
                Err(rx)
            }
        };
        match queued {
            Ok((inputs, fill)) => self.lead(inputs, rows, Instant::now(), fill, forward).await,
            Err(rx) => {
                // Dropping this future (the client went away) drops the wait: leaders then
                // skip the task, and a lead that reached it in the meantime is passed on.
                let mut waiting = Waiting {
                    batcher: self,
                    rx: Some(rx),
                };
                let msg = waiting.rx.as_mut().expect("set above").await;
                waiting.rx = None;
                match msg {
                    Ok(Msg::Done(out)) => out,
                    // A lead passed on from a finished batch: the device is free and this
                    // request was queued, so it runs at once, without the batch timeout.
                    Ok(Msg::Lead(inputs, rows, queued_at)) => {
                        self.lead(inputs, rows, queued_at, false, forward).await
                    }
                    Err(_) => Err(BatchError::Model("the batcher dropped the request".into())),
                }
            }
        }
    }

    /// Runs one batch as the leader: this caller's rows first, then the oldest queued
    /// requests that fit; answers the others, passes the lead on, returns its own rows.
    /// `fill`: this leader found the device idle and counts in `State::filling`; it waits
    /// up to the batch timeout for more rows.
    async fn lead<F: Forward>(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        queued_at: Instant,
        fill: bool,
        forward: &F,
    ) -> Outputs {
        // Whatever happens below, the lead must move on, or the queue would wedge.
        struct PassOnDrop<'a>(&'a Batcher);
        impl Drop for PassOnDrop<'_> {
            fn drop(&mut self) {
                self.0.pass_lead();
            }
        }
        let _pass = PassOnDrop(self);
        if fill {
            // Counted in `filling` by `submit`; uncounted when the wait ends or is
            // cancelled with its caller.
            struct Filling<'a>(&'a Batcher);
            impl Drop for Filling<'_> {
                fn drop(&mut self) {
                    self.0.state.lock().unwrap().filling -= 1;
                }
            }
            let _filling = Filling(self);
            self.wait_to_fill(rows).await;
        }
        let followers = self.take_batch(&inputs, self.policy.max_batch_size - rows);
        let now = Instant::now();
        self.metrics.observe_queue(now - queued_at);
        for t in &followers {
            self.metrics.observe_queue(now - t.queued_at);
        }
        let mut counts = vec![rows];
        counts.extend(followers.iter().map(|t| t.rows));
        let total: usize = counts.iter().sum();
        let padded = self.policy.padded(total);
        let batch = if followers.is_empty() && padded == rows {
            inputs // a batch of one: no copy at all
        } else {
            let mut parts: Vec<&[Tensor]> = vec![&inputs];
            parts.extend(followers.iter().map(|t| &t.inputs[..]));
            concat_rows(&parts, padded)
        };
        let mut results = self.run_batch(batch, &counts, padded, forward).into_iter();
        let own = results.next().expect("the leader's own result");
        for (task, result) in followers.into_iter().zip(results) {
            let _ = task.tx.send(Msg::Done(result));
        }
        own
    }

    /// With `batch_timeout_micros`, an idle device waits up to that long for a batch of
    /// `max_batch_size` rows (its leader's `own` rows and the queued ones), and runs as
    /// soon as there are that many. It sleeps until a request is queued while more than
    /// 2 ms are left; tokio's timer counts in whole milliseconds, so the last stretch
    /// yields in a loop instead, for a deadline kept to the microsecond.
    async fn wait_to_fill(&self, own: usize) {
        let until = Instant::now() + self.policy.batch_timeout;
        loop {
            let notified = self.queued.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.lock().unwrap().queued_rows + own >= self.policy.max_batch_size {
                return;
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            let left = until - now;
            if left > Duration::from_millis(2) {
                let _ = tokio::time::timeout(left - Duration::from_millis(1), notified).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Removes the queued requests whose caller has gone away.
    fn drop_cancelled(&self) {
        let mut st = self.state.lock().unwrap();
        let mut freed = 0;
        st.queue.retain(|t| {
            let gone = t.tx.is_closed();
            if gone {
                freed += t.rows;
            }
            !gone
        });
        if freed > 0 {
            st.queued_rows -= freed;
            self.metrics.set_queue_depth(st.queue.len());
        }
    }

    /// Takes the oldest queued tasks that fit beside `first`: at most `room` rows, with
    /// `first`'s dtypes and non-batch dimensions. Tasks whose caller is gone are dropped.
    fn take_batch(&self, first: &[Tensor], room: usize) -> Vec<Task> {
        let mut st = self.state.lock().unwrap();
        let mut batch: Vec<Task> = Vec::new();
        let mut rows = 0;
        while let Some(front) = st.queue.front() {
            if front.tx.is_closed() {
                let t = st.queue.pop_front().unwrap();
                st.queued_rows -= t.rows;
                continue;
            }
            if rows + front.rows > room || !compatible(first, &front.inputs) {
                break;
            }
            let t = st.queue.pop_front().unwrap();
            st.queued_rows -= t.rows;
            rows += t.rows;
            batch.push(t);
        }
        self.lead_on_free_slots(&mut st, false);
        self.metrics.set_queue_depth(st.queue.len());
        batch
    }

    /// Queued requests go to the slots that are free, oldest first, while no leader is
    /// filling its batch; `one_anyway`: the first free slot is taken even while one is
    /// (a slot freed by a finished batch). Requests whose caller went away are dropped.
    /// With no batch timeout, nothing queues while a slot is free: this hands a freed
    /// slot to the oldest queued request, or finds nothing to do.
    fn lead_on_free_slots(&self, st: &mut State, mut one_anyway: bool) {
        while st.leaders < self.policy.num_batch_threads && (one_anyway || st.filling == 0) {
            let Some(t) = st.queue.pop_front() else { break };
            st.queued_rows -= t.rows;
            if t.tx.send(Msg::Lead(t.inputs, t.rows, t.queued_at)).is_ok() {
                st.leaders += 1;
                one_anyway = false;
            }
        }
    }

    /// Hands the lead, with its inputs, to the oldest queued request whose caller is still
    /// there; with none, frees the device.
    fn pass_lead(&self) {
        let mut st = self.state.lock().unwrap();
        st.leaders -= 1;
        // The oldest queued request takes this slot at once, even while another slot's
        // leader waits to fill its batch: a free slot never idles beside queued work.
        self.lead_on_free_slots(&mut st, true);
        self.metrics.set_queue_depth(st.queue.len());
    }

    /// One forward over a batch of `padded` rows made of requests of `counts` rows;
    /// every request gets its own rows of every output, or the error.
    fn run_batch<F: Forward>(
        &self,
        batch: Vec<Tensor>,
        counts: &[usize],
        padded: usize,
        forward: &F,
    ) -> Vec<Outputs> {
        {
            let mut s = self.stats.lock().unwrap();
            s.batches += 1;
            s.rows += counts.iter().sum::<usize>() as u64;
            s.padded_rows += padded as u64;
        }
        self.metrics.observe_batch(counts.iter().sum(), padded);
        let fail = |msg: String| {
            counts
                .iter()
                .map(|_| Err(BatchError::Model(msg.clone())))
                .collect()
        };
        let outputs = match forward.forward(batch) {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        if let Some((name, t)) = outputs
            .iter()
            .find(|(_, t)| t.shape.first().copied() != Some(padded as i64))
        {
            return fail(format!(
                "output '{name}' has shape {:?}, not {padded} rows: the model's outputs must keep the batch dimension to be batched",
                t.shape
            ));
        }
        if counts.len() == 1 && counts[0] == padded {
            return vec![Ok(outputs)];
        }
        let mut start = 0;
        counts
            .iter()
            .map(|&rows| {
                let out = outputs
                    .iter()
                    .map(|(n, t)| (n.clone(), slice_rows(t, start, rows)))
                    .collect();
                start += rows;
                Ok(out)
            })
            .collect()
    }
}

/// Rows of a request: dim 0, the same for every input.
fn batch_rows(inputs: &[Tensor]) -> Result<usize, BatchError> {
    let mut rows = None;
    for t in inputs {
        let r = *t.shape.first().ok_or_else(|| {
            BatchError::BadInput(
                "a scalar input cannot be batched: inputs need a batch dimension".into(),
            )
        })? as usize;
        if rows.is_some_and(|n| n != r) {
            return Err(BatchError::BadInput(format!(
                "inputs disagree on the batch dimension ({} and {r} rows)",
                rows.unwrap()
            )));
        }
        rows = Some(r);
    }
    rows.filter(|&r| r > 0)
        .ok_or_else(|| BatchError::BadInput("a request needs at least one row".into()))
}

/// Same dtypes and non-batch dimensions, input by input.
fn compatible(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.dtype == y.dtype && x.shape[1..] == y.shape[1..])
}

/// Bytes of one row.
fn row_bytes(t: &Tensor) -> usize {
    crate::tensor::numel(&t.shape[1..]) * t.dtype.size()
}

/// `n` rows of `t` from row `start`.
fn slice_rows(t: &Tensor, start: usize, n: usize) -> Tensor {
    let rb = row_bytes(t);
    let mut shape = t.shape.clone();
    shape[0] = n as i64;
    Tensor {
        dtype: t.dtype,
        shape,
        data: t.data[start * rb..(start + n) * rb].to_vec(),
    }
}

/// Stacks the requests' inputs along dim 0 and pads with zero rows to `padded`: each
/// request's rows are copied once, to their offset.
fn concat_rows(requests: &[&[Tensor]], padded: usize) -> Vec<Tensor> {
    let first = requests[0];
    (0..first.len())
        .map(|i| {
            let rb = row_bytes(&first[i]);
            let mut data = Vec::with_capacity(padded * rb);
            for req in requests {
                data.extend_from_slice(&req[i].data);
            }
            data.resize(padded * rb, 0);
            let mut shape = first[i].shape.clone();
            shape[0] = padded as i64;
            Tensor {
                dtype: first[i].dtype,
                shape,
                data,
            }
        })
        .collect()
}

/// Rejoins the outputs of a split request along dim 0. The parts must agree on the
/// outputs' names, dtypes and non-batch dimensions (a model whose output size depends on
/// its input cannot have a request split): otherwise the request fails with the reason.
fn join_rows(parts: Vec<Vec<(String, Tensor)>>) -> Outputs {
    let mut iter = parts.into_iter();
    let mut joined = iter.next().unwrap_or_default();
    for part in iter {
        let agree = part.len() == joined.len()
            && joined.iter().zip(&part).all(|((n, a), (m, b))| {
                n == m && a.dtype == b.dtype && a.shape[1..] == b.shape[1..]
            });
        if !agree {
            let shapes = |p: &[(String, Tensor)]| {
                p.iter()
                    .map(|(n, t)| format!("{n} {:?}", t.shape))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(BatchError::Model(format!(
                "the request had more rows than max_batch_size and was split, but the model's outputs for its parts differ ({} and {}), so they cannot be rejoined; send at most max_batch_size rows per request",
                shapes(&joined),
                shapes(&part)
            )));
        }
        for ((_, acc), (_, t)) in joined.iter_mut().zip(part) {
            acc.shape[0] += t.shape[0];
            acc.data.extend_from_slice(&t.data);
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn policy(max: usize, allowed: &[usize], enqueued: usize) -> Policy {
        Policy {
            max_batch_size: max,
            batch_timeout: Duration::ZERO,
            allowed_batch_sizes: allowed.to_vec(),
            max_enqueued_batches: enqueued,
            num_batch_threads: 1,
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
        let b = Arc::new(Batcher::new(policy(1, &[], 2), VersionMetrics::default()));
        let f = Doubler::new(50);
        let mut handles = Vec::new();
        for _ in 0..8 {
            let (b, f) = (b.clone(), f.clone());
            handles.push(tokio::spawn(async move {
                b.infer(rows(&[[1.0, 1.0]]), &f).await
            }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
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
            b.infer(rows(&[[1.0, 1.0]]), &f).await.is_ok(),
            "it serves again once drained"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancelled_request_does_not_wedge_the_batcher() {
        let b = Arc::new(Batcher::new(policy(1, &[], 8), VersionMetrics::default()));
        let f = Doubler::new(30);
        let (b1, f1) = (b.clone(), f.clone());
        let running = tokio::spawn(async move { b1.infer(rows(&[[1.0, 1.0]]), &f1).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (b2, f2) = (b.clone(), f.clone());
        let queued = tokio::spawn(async move { b2.infer(rows(&[[2.0, 2.0]]), &f2).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        queued.abort(); // its client went away while it waited
        assert!(running.await.unwrap().is_ok());
        let out = b.infer(rows(&[[3.0, 3.0]]), &f).await;
        assert_eq!(values(&out), vec![6.0, 6.0]);
        assert_eq!(
            f.calls.load(Ordering::SeqCst),
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
        let first =
            tokio::spawn(async move { b1.infer(rows(&[[1.0, 1.0], [1.0, 1.0]]), &f1).await });
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
}
