//! The process-wide engine: `Config` (pooling allocator, epoch interruption), the `Linker`
//! that grants exactly the interfaces of ARCHITECTURE.md, and compiling a bundle's
//! component into a checked, pre-instantiated [`Plugin`] or [`RouterPlugin`]; the import
//! check and `describe` for `nnserve bundle inspect`.
//!
//! It sets the limits up but does not enforce them (`limits`), and serves no request
//! (`instances`).

use super::host::{read_assets, HostInfo, PluginState};
use super::instances::{Common, Plugin, RouterPlugin};
use super::limits::Ticker;
use crate::bundle::Bundle;
use crate::nn::{Dependencies, MemoryPool, ModelLookup, NnView, Runner};
use crate::wit::{self, nnserve::plugin::host as host_api};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Bytes of each plugin memory kept resident between requests (see `PluginRuntime::new`).
const KEEP_RESIDENT: usize = 4 << 20;

/// Interfaces a handler may import (by prefix of the import name).
pub(super) const GRANTED: &[&str] = &[
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:nn/",
    "nnserve:plugin/host",
    "nnserve:plugin/types",
    // Types only (records of the router world).
    "nnserve:plugin/routing",
];

/// Settings of the plugin sandbox (from the server config).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Plugin instances that may run at once, over all plugins; more get a 503.
    pub instance_slots: u32,
    /// Freed memory slots kept warm at most (wasmtime's `max_unused_warm_slots`).
    pub warm_slots: u32,
    /// The largest memory cap a bundle may ask for, MiB (linear and host memory each).
    pub max_memory_mib: u64,
    /// The largest CPU budget per request a bundle may ask for, ms.
    pub max_cpu_ms: u64,
    /// All plugin memory together (linear memories and host tensors), bytes.
    pub total_memory_bytes: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            instance_slots: 256,
            warm_slots: 32,
            max_memory_mib: 512,
            max_cpu_ms: 60_000,
            total_memory_bytes: 4 << 30,
        }
    }
}

/// The process-wide Wasm engine and linker.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<PluginState>,
    config: RuntimeConfig,
    ticker: Arc<Ticker>,
    memory: Arc<MemoryPool>,
    /// Where handlers find the models they declare as dependencies (the registry, set
    /// once it exists).
    lookup: std::sync::OnceLock<std::sync::Weak<dyn ModelLookup>>,
}

impl Drop for PluginRuntime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.thread.get() {
            t.unpark();
        }
    }
}

impl PluginRuntime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<PluginRuntime> {
        let mut pool = PoolingAllocationConfig::default();
        let slots = config.instance_slots.max(1);
        pool.total_component_instances(slots)
            .total_core_instances(slots * 8)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .total_stacks(slots)
            .max_core_instances_per_component(16)
            .max_memories_per_component(2)
            .max_tables_per_component(8)
            .max_memory_size((config.max_memory_mib as usize) << 20);
        // A fresh instance per request would otherwise page-fault in every page it
        // touches, since a freed slot is reset with madvise. Keeping the low pages
        // resident and resetting only the dirty ones (PAGEMAP_SCAN, Linux 6.7+; a
        // plain memset of the low pages elsewhere) cut the digits plugin call from
        // about 410 to 290 us and an instantiate + trivial call from 36 to 13 us
        // (docs/design.md).
        pool.linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto)
            // Past this many warm slots, a plugin without a warm slot of its own takes
            // the least recently used one rather than a slot never used. wasmtime's
            // default (100) let resident memory creep up to 100 x 4 MiB as plugins
            // and their versions came and went (bench/README.md, session 15).
            .max_unused_warm_slots(config.warm_slots);
        let mut c = Config::new();
        c.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // A plugin's `compute` that leads a batch runs the model's forward (libtorch,
            // or the CUDA driver) on this call's fiber stack, below whatever the guest's
            // wasm used (up to `max_wasm_stack`, 512 KiB). 4 MiB leaves that forward more
            // than the 2 MiB a runtime worker thread has; untouched pages cost nothing.
            .async_stack_size(4 << 20);
        // For plugin authors and us: `NNSERVE_WASM_PERFMAP=1` writes /tmp/perf-PID.map,
        // so that `perf record`/`perf report` name the guest's functions (docs/plugins.md).
        if std::env::var_os("NNSERVE_WASM_PERFMAP").is_some_and(|v| v != "0") {
            c.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&c)?;

        // The epoch ticker: guest CPU budgets are counted in these ticks. It sleeps while
        // no plugin has run for IDLE_TICKS.
        let weak = engine.weak();
        let ticker = Arc::new(Ticker::default());
        let t = ticker.clone();
        let handle = std::thread::Builder::new()
            .name("nnserve-epoch".into())
            .spawn(move || t.run(weak))?;
        let _ = ticker.thread.set(handle.thread().clone());

        let mut linker = Linker::<PluginState>::new(&engine);
        add_granted_wasi(&mut linker)?;
        crate::nn::add_to_linker(&mut linker, |s: &mut PluginState| NnView {
            table: &mut s.table,
            ctx: &mut s.nn,
        })?;
        host_api::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)?;
        Ok(PluginRuntime {
            engine,
            linker,
            memory: Arc::new(MemoryPool::new(config.total_memory_bytes)),
            config,
            ticker,
            lookup: std::sync::OnceLock::new(),
        })
    }

    /// Where handlers loaded from now on find their declared dependencies. Set once:
    /// later calls are ignored.
    pub fn set_lookup(&self, lookup: std::sync::Weak<dyn ModelLookup>) {
        let _ = self.lookup.set(lookup);
    }

    /// The instance pool's gauges (slots in use, warm, kept resident).
    pub fn pool_metrics(&self) -> Option<wasmtime::PoolingAllocatorMetrics> {
        self.engine.pooling_allocator_metrics()
    }

    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(super) fn linker(&self) -> &Linker<PluginState> {
        &self.linker
    }

    /// All plugin memory together, as charged now.
    pub fn memory(&self) -> &Arc<MemoryPool> {
        &self.memory
    }

    /// Compiles and checks a bundle's handler plugin. Blocking (compilation takes
    /// a while): call it off the async runtime.
    /// `runner`: the bundle's model, or `None` for a model-less handler (its
    /// `load-by-name` finds no graph).
    pub fn load_handler(
        &self,
        bundle: &Bundle,
        runner: Option<Arc<Runner>>,
    ) -> anyhow::Result<Plugin> {
        let spec = bundle
            .manifest
            .handler
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the bundle has no [handler]"))?;
        let (component, common) = self.compile(bundle, spec, "handler")?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("plugin {} cannot be linked: {e:#}", spec.path))?;
        let pre = wit::HandlerPre::new(pre).map_err(|e| {
            anyhow::anyhow!(
                "plugin {} does not export the nnserve:plugin/handler world: {e:#}",
                spec.path
            )
        })?;
        Ok(Plugin {
            common,
            pre,
            model_name: bundle.name().to_string(),
            runner,
            deps: match (spec.dependencies(), self.lookup.get()) {
                (declared, _) if declared.is_empty() => None,
                (declared, Some(lookup)) => Some(Dependencies {
                    declared: declared.into(),
                    lookup: lookup.clone(),
                }),
                (_, None) => anyhow::bail!(
                    "the bundle declares [handler] dependencies, but nothing here serves other models"
                ),
            },
        })
    }

    /// Compiles and checks an endpoint bundle's router plugin. Blocking.
    pub fn load_router(&self, bundle: &Bundle) -> anyhow::Result<RouterPlugin> {
        let spec = bundle
            .manifest
            .router
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the bundle has no [router]"))?;
        let (component, common) = self.compile(bundle, spec, "router")?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("plugin {} cannot be linked: {e:#}", spec.path))?;
        let pre = wit::router::RouterPre::new(pre).map_err(|e| {
            anyhow::anyhow!(
                "plugin {} does not export the nnserve:plugin/router world (route): {e:#}",
                spec.path
            )
        })?;
        Ok(RouterPlugin {
            common,
            pre,
            idle: Default::default(),
        })
    }

    /// What both kinds of plugin share: limits, compilation, the import check, config
    /// and assets.
    fn compile(
        &self,
        bundle: &Bundle,
        spec: &crate::bundle::PluginSpec,
        world: &str,
    ) -> anyhow::Result<(Component, Common)> {
        let name = format!("{}@{} ({})", bundle.name(), bundle.version(), spec.path);
        if spec.limits.memory_mib > self.config.max_memory_mib {
            anyhow::bail!(
                "{world}.limits.memory_mib = {} is above the server's maximum of {} MiB (plugin_max_memory_mib)",
                spec.limits.memory_mib,
                self.config.max_memory_mib
            );
        }
        if spec.limits.host_memory_mib() > self.config.max_memory_mib {
            anyhow::bail!(
                "{world}.limits.host_memory_mib = {} is above the server's maximum of {} MiB (plugin_max_memory_mib)",
                spec.limits.host_memory_mib(),
                self.config.max_memory_mib
            );
        }
        if spec.limits.cpu_ms > self.config.max_cpu_ms {
            anyhow::bail!(
                "{world}.limits.cpu_ms = {} is above the server's maximum of {} ms (plugin_max_cpu_ms)",
                spec.limits.cpu_ms,
                self.config.max_cpu_ms
            );
        }
        let path = bundle.file(&spec.path);
        let wasm = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("plugin {} cannot be read: {e}", spec.path))?;
        let component = Component::new(&self.engine, &wasm).map_err(|e| {
            anyhow::anyhow!(
                "plugin {} is not a valid WebAssembly component: {e:#} (build it with `cargo build --target wasm32-wasip2`)",
                spec.path
            )
        })?;
        check_imports(&self.engine, &component, world)
            .map_err(|e| anyhow::anyhow!("plugin {} is refused: {e}", spec.path))?;
        if let Some(start) = initial_memory_bytes(&component) {
            let cap = spec.limits.memory_mib << 20;
            if start > cap {
                let need = start.div_ceil(1 << 20);
                let fix = if need <= self.config.max_memory_mib {
                    format!("set {world}.limits.memory_mib to at least {need} in bundle.toml, or ")
                } else {
                    String::new() // above what the server allows: only a smaller start helps
                };
                anyhow::bail!(
                    "plugin {} starts with {} KiB of linear memory, above its {world}.limits.memory_mib = {}: \
                     {fix}link the plugin with a smaller -Clink-arg=--initial-memory (docs/plugins.md)",
                    spec.path,
                    start >> 10,
                    spec.limits.memory_mib
                );
            }
            if start < SMALL_INITIAL_MEMORY {
                tracing::info!(
                    "plugin {name} starts with {} KiB of linear memory: a request that allocates \
                     more grows it, and the next instantiation pays an mprotect to shrink it back \
                     (0.1-0.2 ms); link it with {INITIAL_MEMORY_FLAG} (docs/plugins.md)",
                    start >> 10
                );
            }
        }
        let common = Common {
            memory: self.memory.clone(),
            ticker: self.ticker.clone(),
            name: name.clone(),
            init: spec.init,
            limits: spec.limits,
            host: Arc::new(HostInfo {
                plugin: name,
                config: spec.config_strings(),
                config_json: spec.config_json(),
                assets: read_assets(&bundle.dir)?,
            }),
        };
        // A handler's one-time setup (`init`), snapshotted: what every request starts from.
        let component = match world {
            "handler" => self
                .preinit(&wasm, component, &common)
                .map_err(|e| anyhow::anyhow!("plugin {}: {e:#}", spec.path))?,
            _ => component,
        };
        Ok((component, common))
    }
}

/// The imports of `names` that nnserve does not grant to a plugin of `world`
/// (`handler` or `router`; a router gets no `wasi:nn`).
pub fn refused_imports(names: &[String], world: &str) -> Vec<String> {
    names
        .iter()
        .filter(|name| {
            !GRANTED.iter().any(|g| name.starts_with(g))
                || world == "router" && name.starts_with("wasi:nn/")
        })
        .cloned()
        .collect()
}

fn import_names(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// What a component file imports and exports, for `nnserve bundle inspect` and `pack`.
pub struct ComponentInfo {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// The imports nnserve would refuse.
    pub refused: Vec<String>,
    /// The largest linear memory the component starts with, in bytes (None when it
    /// cannot be known before instantiation).
    pub initial_memory: Option<u64>,
}

/// A plugin that starts with less linear memory than this is told at load how to start
/// with more (see [`initial_memory_bytes`]).
pub const SMALL_INITIAL_MEMORY: u64 = 2 << 20;

/// The link flag that gives a Rust plugin 4 MiB at start (docs/plugins.md).
pub const INITIAL_MEMORY_FLAG: &str = "-Clink-arg=--initial-memory=4194304";

/// The largest initial linear memory of a component's core modules, in bytes.
///
/// It matters for speed: a guest that allocates past its initial memory grows it, and
/// when the pooling allocator gives the slot to the next request it shrinks the
/// accessible region back with `mprotect`, which on a multi-core host is a TLB
/// shootdown (an IPI to every core running the process). The digits plugin paid two
/// `mprotect`s per request, the imagenet-classifier two to nine: linked with
/// `--initial-memory=4194304` (this repository's `.cargo/config.toml`) they pay none,
/// and digits at 64 clients serves 25 % more (bench/README.md, session 6).
pub fn initial_memory_bytes(component: &Component) -> Option<u64> {
    component
        .resources_required()?
        .max_initial_memory_size
        .map(|pages| pages << 16)
}

/// Compiles a component (without running it) and lists its imports and exports.
pub fn describe(path: &Path) -> anyhow::Result<ComponentInfo> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config)?;
    let component = Component::from_file(&engine, path).map_err(|e| {
        anyhow::anyhow!("not a WebAssembly component: {e:#} (build it with `cargo build --target wasm32-wasip2`)")
    })?;
    let imports = import_names(&engine, &component);
    let exports: Vec<String> = component
        .component_type()
        .exports(&engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let world = if exports.iter().any(|e: &String| e == "route") {
        "router"
    } else {
        "handler"
    };
    Ok(ComponentInfo {
        refused: refused_imports(&imports, world),
        imports,
        exports,
        initial_memory: initial_memory_bytes(&component),
    })
}

/// Refuses a component that imports anything not granted, naming every such import.
fn check_imports(engine: &Engine, component: &Component, world: &str) -> anyhow::Result<()> {
    let refused = refused_imports(&import_names(engine, component), world);
    if refused.is_empty() {
        Ok(())
    } else {
        let nn = if world == "router" { "" } else { "wasi:nn, " };
        anyhow::bail!(
            "it imports {}, which nnserve does not grant to a {world} (plugins may import {nn}nnserve:plugin/host, and wasi:io, wasi:cli, wasi:clocks, wasi:random, wasi:filesystem without directories)",
            refused.join(", ")
        )
    }
}

/// Links the WASI that a Rust std guest needs, and nothing more: no sockets, no HTTP.
/// Files: the interfaces exist but there is no preopened directory.
fn add_granted_wasi(l: &mut Linker<PluginState>) -> anyhow::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
    use wasmtime_wasi::random::WasiRandom;
    type S = PluginState;
    wasmtime_wasi_io::add_to_linker_async(l)?;
    clocks::wall_clock::add_to_linker::<S, WasiClocks>(l, S::clocks)?;
    clocks::monotonic_clock::add_to_linker::<S, WasiClocks>(l, S::clocks)?;
    random::random::add_to_linker::<S, WasiRandom>(l, |s| s.wasi.random())?;
    random::insecure::add_to_linker::<S, WasiRandom>(l, |s| s.wasi.random())?;
    random::insecure_seed::add_to_linker::<S, WasiRandom>(l, |s| s.wasi.random())?;
    cli::exit::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::environment::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::stdin::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::stdout::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::stderr::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::terminal_input::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::terminal_output::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::terminal_stdin::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::terminal_stdout::add_to_linker::<S, WasiCli>(l, S::cli)?;
    cli::terminal_stderr::add_to_linker::<S, WasiCli>(l, S::cli)?;
    filesystem::preopens::add_to_linker::<S, WasiFilesystem>(l, S::filesystem)?;
    filesystem::types::add_to_linker::<S, WasiFilesystem>(l, S::filesystem)?;
    Ok(())
}
