//! Model execution for requests: the per-version [`Runner`] (the execution path that the
//! tensor APIs and wasi-nn share) and the host side of the standard `wasi:nn` interface.
//!
//! `nn` knows the model's signature and the backend; it knows nothing of HTTP or of
//! which plugin calls it. The batcher sits inside [`Runner::forward`].
//!
//! ## The execution path and its hand-off
//! A version runs at most `concurrency` forwards at once: one unless the model is
//! compute-bound on the CPU, where it is one per core with the cores shared among them
//! (`backend::threading`; with batching this is `num_batch_threads`, without it a gate's
//! permits). The caller that gets its turn runs the forward itself, without handing it to
//! another thread: a cross-thread hand-off costs more than a tiny model's forward
//! (../shared/FACTS.md). The one exception is below this module: the torch backend runs a
//! CPU forward of more than one intra-op thread on its forward threads, and the caller
//! waits for it (libgomp must not grow a team on every thread that calls; see
//! `backend::torch`). Forwards that have been slow (moving average over
//! [`INLINE_LIMIT`]) run inside `tokio::task::block_in_place`, so the worker's other
//! tasks move to another thread while libtorch works; quick ones run inline, as a JSON
//! parse would.

use crate::backend::{Model, Threading};
use crate::batching::{BatchError, Batcher, Policy};
use crate::bundle::{BatchingSpec, TensorSpec};
use crate::metrics::VersionMetrics;
use crate::tensor::{check_shape, DType, Tensor};
use crate::wit::wasi::nn as gen;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{HasData, Resource, ResourceTable};

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
    pub fn new(
        model: Arc<dyn Model>,
        inputs: Vec<TensorSpec>,
        batching: Option<&BatchingSpec>,
        metrics: VersionMetrics,
        threading: Threading,
    ) -> Runner {
        let concurrency = threading.concurrency.max(1);
        model.set_threads(threading.intra_op);
        Runner {
            threading,
            model,
            inputs,
            gate: tokio::sync::Semaphore::new(concurrency),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            batcher: batching.map(|b| {
                let policy = Policy {
                    num_batch_threads: concurrency,
                    ..Policy::from(b)
                };
                Batcher::new(policy, metrics.clone())
            }),
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

// ---------------------------------------------------------------------------------
// wasi:nn host

/// A graph as the guest holds it: the runner of the version being served.
pub struct Graph {
    runner: Arc<Runner>,
}

/// An execution context: a graph bound for `compute`.
pub struct ExecContext {
    runner: Arc<Runner>,
}

/// A tensor as wasi-nn describes it.
pub struct HostTensor {
    dims: Vec<u32>,
    ty: gen::tensor::TensorType,
    data: Vec<u8>,
}

/// A wasi-nn error resource.
#[derive(Debug)]
pub struct NnError {
    code: gen::errors::ErrorCode,
    data: String,
}

/// Per-request wasi-nn state: which graphs `load-by-name` may return, the time spent in
/// host calls (which the plugin's CPU budget does not count), and the host memory its
/// resources hold.
pub struct NnCtx {
    names: Vec<String>,
    runner: Option<Arc<Runner>>,
    pub host_time: Duration,
    /// A `compute` was refused because the model's queue was full.
    pub overloaded: bool,
    memory: HostMemory,
}

/// Host memory that a plugin's wasi-nn resources hold (tensors it creates, a model's
/// outputs, graphs, errors): at most `budget` bytes per request (`limits.host_memory_mib`),
/// each byte also charged to the server-wide plugin memory pool while it is held. A
/// plugin capped at 64 MiB of linear memory made 64 host tensors of 32 MiB before this.
struct HostMemory {
    budget: u64,
    used: u64,
    pool: Option<Arc<crate::plugin::MemoryPool>>,
}

/// What a resource costs beside its data: the table slot and the value's own fields.
const RESOURCE_OVERHEAD: u64 = 64;

impl HostMemory {
    fn charge(&mut self, bytes: u64) -> Result<(), wasmtime::Error> {
        if self.used.saturating_add(bytes) > self.budget {
            return Err(wasmtime::Error::new(HostMemoryExceeded {
                budget_mib: self.budget >> 20,
            }));
        }
        if let Some(pool) = &self.pool {
            if !pool.try_charge(bytes) {
                return Err(wasmtime::Error::new(crate::plugin::PoolExhausted {
                    cap_mib: pool.cap() >> 20,
                }));
            }
        }
        self.used += bytes;
        Ok(())
    }

    fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.used);
        self.used -= bytes;
        if let Some(pool) = &self.pool {
            pool.release(bytes);
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        let used = self.used;
        self.release(used);
    }
}

/// A plugin's wasi-nn resources would hold more host memory than its budget.
#[derive(Debug)]
pub struct HostMemoryExceeded {
    pub budget_mib: u64,
}

impl std::fmt::Display for HostMemoryExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its tensors needed more host memory than its budget of {} MiB \
             (limits.host_memory_mib in bundle.toml; drop tensors it no longer needs)",
            self.budget_mib
        )
    }
}

impl std::error::Error for HostMemoryExceeded {}

impl NnCtx {
    /// `load-by-name` answers `model_name` and `default` with `runner`, nothing else;
    /// its resources may hold `host_budget` bytes, charged to `pool` too.
    pub fn new(
        model_name: &str,
        runner: Arc<Runner>,
        host_budget: u64,
        pool: Arc<crate::plugin::MemoryPool>,
    ) -> NnCtx {
        NnCtx {
            names: vec![model_name.to_string(), "default".to_string()],
            runner: Some(runner),
            host_time: Duration::ZERO,
            overloaded: false,
            memory: HostMemory {
                budget: host_budget,
                used: 0,
                pool: Some(pool),
            },
        }
    }

    /// No graph at all (a router plugin).
    pub fn none() -> NnCtx {
        NnCtx {
            names: Vec::new(),
            runner: None,
            host_time: Duration::ZERO,
            overloaded: false,
            memory: HostMemory {
                budget: 1 << 20,
                used: 0,
                pool: None,
            },
        }
    }

    /// Host bytes the request's resources hold now.
    pub fn host_bytes(&self) -> u64 {
        self.memory.used
    }
}

/// The view of the store that the wasi-nn host functions work on.
pub struct NnView<'a> {
    pub table: &'a mut ResourceTable,
    pub ctx: &'a mut NnCtx,
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds the four `wasi:nn` interfaces to a linker.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    f: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    gen::graph::add_to_linker::<T, HasNn>(linker, f)?;
    gen::tensor::add_to_linker::<T, HasNn>(linker, f)?;
    gen::inference::add_to_linker::<T, HasNn>(linker, f)?;
    gen::errors::add_to_linker::<T, HasNn>(linker, f)?;
    Ok(())
}

type NnResult<T> = wasmtime::Result<Result<T, Resource<NnError>>>;

impl NnView<'_> {
    fn fail<T>(&mut self, code: gen::errors::ErrorCode, data: String) -> NnResult<T> {
        let e = self.push(NnError { code, data })?;
        Ok(Err(e))
    }

    /// Pushes a resource, charging its host memory (a trap when over the budget).
    fn push<T: Charged + Send + 'static>(&mut self, value: T) -> wasmtime::Result<Resource<T>> {
        let bytes = value.host_bytes();
        let r = self.table.push(value)?;
        if let Err(e) = self.ctx.memory.charge(bytes) {
            self.table.delete(r)?;
            return Err(e);
        }
        Ok(r)
    }

    /// Deletes a resource, releasing its host memory.
    fn delete<T: Charged + 'static>(&mut self, r: Resource<T>) -> wasmtime::Result<T> {
        let value = self.table.delete(r)?;
        self.ctx.memory.release(value.host_bytes());
        Ok(value)
    }
}

/// A wasi-nn resource's host memory, as charged while it is held.
trait Charged {
    fn host_bytes(&self) -> u64;
}

impl Charged for HostTensor {
    fn host_bytes(&self) -> u64 {
        RESOURCE_OVERHEAD + self.data.len() as u64 + 4 * self.dims.len() as u64
    }
}

impl Charged for NnError {
    fn host_bytes(&self) -> u64 {
        RESOURCE_OVERHEAD + self.data.len() as u64
    }
}

impl Charged for Graph {
    fn host_bytes(&self) -> u64 {
        RESOURCE_OVERHEAD
    }
}

impl Charged for ExecContext {
    fn host_bytes(&self) -> u64 {
        RESOURCE_OVERHEAD
    }
}

fn wasi_type(d: DType) -> Option<gen::tensor::TensorType> {
    use gen::tensor::TensorType as T;
    Some(match d {
        DType::Fp16 => T::Fp16,
        DType::Fp32 => T::Fp32,
        DType::Fp64 => T::Fp64,
        DType::Bf16 => T::Bf16,
        DType::Uint8 => T::U8,
        DType::Int32 => T::I32,
        DType::Int64 => T::I64,
        _ => return None,
    })
}

fn host_dtype(t: gen::tensor::TensorType) -> DType {
    use gen::tensor::TensorType as T;
    match t {
        T::Fp16 => DType::Fp16,
        T::Fp32 => DType::Fp32,
        T::Fp64 => DType::Fp64,
        T::Bf16 => DType::Bf16,
        T::U8 => DType::Uint8,
        T::I32 => DType::Int32,
        T::I64 => DType::Int64,
    }
}

/// Outputs whose dtype wasi-nn cannot name are widened: bool and int8 to u8/i32,
/// int16 to i32. Documented in docs/plugins.md.
fn to_wasi_tensor(t: Tensor) -> HostTensor {
    let dims = t.shape.iter().map(|&d| d as u32).collect();
    if let Some(ty) = wasi_type(t.dtype) {
        return HostTensor {
            dims,
            ty,
            data: t.data,
        };
    }
    let (ty, data) = match t.dtype {
        DType::Bool => (gen::tensor::TensorType::U8, t.data),
        _ => (
            gen::tensor::TensorType::I32,
            t.to_f64_vec()
                .into_iter()
                .flat_map(|v| (v as i32).to_le_bytes())
                .collect(),
        ),
    };
    HostTensor { dims, ty, data }
}

impl gen::graph::Host for NnView<'_> {
    fn load(
        &mut self,
        _builder: Vec<Vec<u8>>,
        _encoding: gen::graph::GraphEncoding,
        _target: gen::graph::ExecutionTarget,
    ) -> NnResult<Resource<Graph>> {
        self.fail(
            gen::errors::ErrorCode::Security,
            "loading a model from bytes is not allowed in nnserve; use load-by-name with the bundle's model name (or \"default\")".into(),
        )
    }

    fn load_by_name(&mut self, name: String) -> NnResult<Resource<Graph>> {
        if let Some(runner) = self
            .ctx
            .runner
            .as_ref()
            .filter(|_| self.ctx.names.contains(&name))
        {
            let g = Graph {
                runner: runner.clone(),
            };
            Ok(Ok(self.push(g)?))
        } else {
            let known = self.ctx.names.join("\", \"");
            self.fail(
                gen::errors::ErrorCode::NotFound,
                format!(
                    "no graph named {} is available to this plugin (try \"{known}\")",
                    crate::names::shown(&name)
                ),
            )
        }
    }
}

impl gen::graph::HostGraph for NnView<'_> {
    fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> NnResult<Resource<ExecContext>> {
        let runner = self.table.get(&graph)?.runner.clone();
        Ok(Ok(self.push(ExecContext { runner })?))
    }

    fn drop(&mut self, graph: Resource<Graph>) -> wasmtime::Result<()> {
        self.delete(graph)?;
        Ok(())
    }
}

impl gen::tensor::Host for NnView<'_> {}

impl gen::tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dims: Vec<u32>,
        ty: gen::tensor::TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<HostTensor>> {
        self.push(HostTensor { dims, ty, data })
    }

    fn dimensions(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&t)?.dims.clone())
    }

    fn ty(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<gen::tensor::TensorType> {
        Ok(self.table.get(&t)?.ty)
    }

    fn data(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&t)?.data.clone())
    }

    fn drop(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<()> {
        self.delete(t)?;
        Ok(())
    }
}

impl gen::inference::Host for NnView<'_> {}

impl gen::inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        ctx: Resource<ExecContext>,
        inputs: Vec<(String, Resource<HostTensor>)>,
    ) -> NnResult<Vec<(String, Resource<HostTensor>)>> {
        let runner = self.table.get(&ctx)?.runner.clone();
        let mut named = Vec::with_capacity(inputs.len());
        for (name, res) in inputs {
            let t = self.delete(res)?;
            let shape = t.dims.iter().map(|&d| d as i64).collect();
            match Tensor::new(host_dtype(t.ty), shape, t.data) {
                Ok(tensor) => named.push((name, tensor)),
                Err(e) => {
                    return self.fail(
                        gen::errors::ErrorCode::InvalidArgument,
                        format!("input {}: {e}", crate::names::shown(&name)),
                    )
                }
            }
        }
        let started = Instant::now();
        let result = runner.infer(named).await;
        self.ctx.host_time += started.elapsed();
        match result {
            Ok(outputs) => {
                // A refusal the plugin retried past is not why it may fail later.
                self.ctx.overloaded = false;
                let mut out = Vec::with_capacity(outputs.len());
                for (name, t) in outputs {
                    out.push((name, self.push(to_wasi_tensor(t))?));
                }
                Ok(Ok(out))
            }
            Err(InferError::BadInput(m)) => self.fail(gen::errors::ErrorCode::InvalidArgument, m),
            Err(InferError::Model(m)) => self.fail(gen::errors::ErrorCode::RuntimeError, m),
            // wasi-nn has no "busy" code; the SDK turns `timeout` into `unavailable`,
            // which the host answers as 429 when this flag is set (plugin::PluginError).
            Err(InferError::Overloaded(m)) => {
                self.ctx.overloaded = true;
                self.fail(gen::errors::ErrorCode::Timeout, m)
            }
        }
    }

    fn drop(&mut self, ctx: Resource<ExecContext>) -> wasmtime::Result<()> {
        self.delete(ctx)?;
        Ok(())
    }
}

impl gen::errors::Host for NnView<'_> {}

impl gen::errors::HostError for NnView<'_> {
    fn code(&mut self, e: Resource<NnError>) -> wasmtime::Result<gen::errors::ErrorCode> {
        Ok(self.table.get(&e)?.code)
    }

    fn data(&mut self, e: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.data.clone())
    }

    fn drop(&mut self, e: Resource<NnError>) -> wasmtime::Result<()> {
        self.delete(e)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::IntraOp;

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
        while r.queue_depth() < WAITING_PER_SLOT
            || rest.iter().filter(|c| c.is_finished()).count() < 2
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
}
