//! The host side of the standard `wasi:nn` interface, as wasmtime's `wasi-nn/src/wit.rs`
//! implements it: the resources a guest holds (graph, execution context, tensor, error)
//! in the store's table, the per-request [`NnCtx`] (which graphs `load-by-name` may
//! return, time spent in host calls, the host memory its resources hold) and the
//! generated traits implemented over [`NnView`].
//!
//! It runs models only through [`Runner`]; it does not know which plugin calls it, and
//! the generated bindings (`crate::wit`) stay behind this file.

use super::pool::{MemoryPool, PoolExhausted};
use super::runner::{InferError, Runner};
use crate::bundle::Dependency;
use crate::tensor::{DType, Tensor};
use crate::wit::wasi::nn as gen;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use wasmtime::component::{HasData, Resource, ResourceTable};

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
    pub(super) ty: gen::tensor::TensorType,
    pub(super) data: Vec<u8>,
}

/// A wasi-nn error resource.
#[derive(Debug)]
pub struct NnError {
    code: gen::errors::ErrorCode,
    data: String,
}

/// Finds the runner a declared dependency names now (implemented by the lifecycle's
/// registry, which `nn` must not know).
pub trait ModelLookup: Send + Sync {
    /// The runner of the version `dep` names now, or why there is none: a sentence a
    /// client may read (it names only the model, version and state).
    fn dependency(&self, dep: &Dependency) -> Result<Arc<Runner>, String>;
}

/// The models a handler declared besides its own, and where to find them. The lookup is
/// weak: the registry holds the plugins that hold this.
#[derive(Clone)]
pub struct Dependencies {
    pub declared: Arc<[Dependency]>,
    pub lookup: Weak<dyn ModelLookup>,
}

/// Why a plugin's error is not what it says: the host saw the cause in a wasi-nn call.
#[derive(Debug, Clone, PartialEq)]
pub enum Blame {
    /// The model refused an input the plugin built (a shape or dtype it does not take):
    /// the plugin's bug (it should have checked the request), a 500 that names it.
    Refused(String),
    /// The plugin loaded a model it did not declare: its bug too, a 500.
    Undeclared(String),
    /// A declared dependency has no version to serve now: a 503 the client may retry.
    DependencyDown(String),
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
    /// The first cause the host saw for a failure that follows (a refused input, an
    /// undeclared or unavailable model): it decides whom the error blames.
    pub blame: Option<Blame>,
    deps: Option<Dependencies>,
    memory: HostMemory,
}

/// Host memory that a plugin's wasi-nn resources hold (tensors it creates, a model's
/// outputs, graphs, errors): at most `budget` bytes per request (`limits.host_memory_mib`),
/// each byte also charged to the server-wide plugin memory pool while it is held. A
/// plugin capped at 64 MiB of linear memory made 64 host tensors of 32 MiB before this.
struct HostMemory {
    budget: u64,
    used: u64,
    pool: Option<Arc<MemoryPool>>,
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
                return Err(wasmtime::Error::new(PoolExhausted {
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
    /// `load-by-name` answers `model_name` and `default` with `runner` (when the bundle
    /// has a model) and each declared dependency's name with its runner of the moment;
    /// its resources may hold `host_budget` bytes, charged to `pool` too.
    pub fn new(
        model_name: &str,
        runner: Option<Arc<Runner>>,
        deps: Option<Dependencies>,
        host_budget: u64,
        pool: Arc<MemoryPool>,
    ) -> NnCtx {
        NnCtx {
            names: match runner {
                Some(_) => vec![model_name.to_string(), "default".to_string()],
                None => Vec::new(),
            },
            runner,
            host_time: Duration::ZERO,
            overloaded: false,
            blame: None,
            deps,
            memory: HostMemory {
                budget: host_budget,
                used: 0,
                pool: Some(pool),
            },
        }
    }

    /// No graph at all (a router plugin, a model-less handler).
    pub fn none() -> NnCtx {
        NnCtx {
            names: Vec::new(),
            runner: None,
            host_time: Duration::ZERO,
            overloaded: false,
            blame: None,
            deps: None,
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
        if code == gen::errors::ErrorCode::InvalidArgument && self.ctx.blame.is_none() {
            self.ctx.blame = Some(Blame::Refused(crate::names::bounded(&data)));
        }
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
pub(super) fn to_wasi_tensor(t: Tensor) -> HostTensor {
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
            return Ok(Ok(self.push(g)?));
        }
        let deps = self.ctx.deps.clone();
        let declared = deps.as_ref().and_then(|d| {
            d.declared
                .iter()
                .find(|dep| dep.model == name)
                .map(|dep| (dep, d))
        });
        if let Some((dep, d)) = declared {
            let found = match d.lookup.upgrade() {
                Some(lookup) => lookup.dependency(dep),
                None => Err("the server is shutting down".to_string()),
            };
            return match found {
                Ok(runner) => Ok(Ok(self.push(Graph { runner })?)),
                Err(why) => {
                    let data = format!("dependency {dep} cannot serve now: {why}");
                    self.ctx
                        .blame
                        .get_or_insert(Blame::DependencyDown(data.clone()));
                    self.fail(gen::errors::ErrorCode::NotFound, data)
                }
            };
        }
        let mut known: Vec<String> = self.ctx.names.clone();
        known.extend(
            deps.iter()
                .flat_map(|d| d.declared.iter().map(|x| x.model.clone())),
        );
        let data = if known.is_empty() {
            format!(
                "no graph named {}: this bundle has no [model] and declares no [handler] dependencies",
                crate::names::shown(&name)
            )
        } else {
            format!(
                "no graph named {} is available to this plugin: it may load \"{}\", and another \
                 model only once [handler] dependencies in bundle.toml declares it",
                crate::names::shown(&name),
                known.join("\", \"")
            )
        };
        self.ctx
            .blame
            .get_or_insert(Blame::Undeclared(data.clone()));
        self.fail(gen::errors::ErrorCode::NotFound, data)
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
