//! Plugins: WebAssembly components run by wasmtime in a sandbox.
//!
//! One [`PluginRuntime`] per process owns the `Engine` (pooling allocator, epoch
//! interruption) and the `Linker` that grants exactly the interfaces of
//! ARCHITECTURE.md, interface by interface. A [`Plugin`] is one compiled component,
//! checked and pre-instantiated at load; every request gets a fresh `Store` with the
//! bundle's memory cap and two budgets:
//!
//! - the plugin's own CPU time (`limits.cpu_ms`), counted only while guest code runs:
//!   the epoch ticks every millisecond, and the deadline callback charges the time since
//!   its last check up to the ticks the guest was given, less the time spent in host
//!   calls such as `compute` ([`CpuMeter`]: waiting for a core is not running);
//! - the request's wall-clock deadline, over everything (queueing and forward too).
//!
//! This module must not reach into HTTP; `api` maps [`PluginError`] to statuses.

use crate::bundle::{Bundle, PluginLimits};
use crate::nn::{NnCtx, NnView, Runner};
use crate::wit::{self, nnserve::plugin::host as host_api};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// One epoch tick.
const TICK: Duration = Duration::from_millis(1);
/// A running guest yields to tokio at least this often (in ticks), so that the
/// request's wall-clock deadline can fire and other tasks on the worker get a turn.
const YIELD_TICKS: u64 = 5;

/// Bytes of each plugin memory kept resident between requests (see `PluginRuntime::new`).
const KEEP_RESIDENT: usize = 4 << 20;

/// Interfaces a handler may import (by prefix of the import name).
const GRANTED: &[&str] = &[
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
}

/// All plugin memory together: every running instance's linear memory and the host
/// memory its wasi-nn resources hold are charged here while they exist, so that 256
/// instance slots of up to 512 MiB each are not the bound; `plugin_memory_total_mib` is.
#[derive(Debug)]
pub struct MemoryPool {
    used: std::sync::atomic::AtomicU64,
    cap: u64,
}

impl MemoryPool {
    pub fn new(cap: u64) -> MemoryPool {
        MemoryPool {
            used: Default::default(),
            cap,
        }
    }

    /// Charges `bytes`, or refuses (charging nothing) when the pool would go past its cap.
    pub fn try_charge(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.cap)
            })
            .is_ok()
    }

    pub fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// A plugin's linear memory would pass its `limits.memory_mib`.
#[derive(Debug)]
pub struct MemoryCapReached {
    pub cap_mib: u64,
}

impl std::fmt::Display for MemoryCapReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it needed more than its memory cap of {} MiB (limits.memory_mib in bundle.toml)",
            self.cap_mib
        )
    }
}

impl std::error::Error for MemoryCapReached {}

/// All plugins together hold the server's whole plugin memory: not this plugin's fault,
/// a 503 to retry.
#[derive(Debug)]
pub struct PoolExhausted {
    pub cap_mib: u64,
}

impl std::fmt::Display for PoolExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the plugins running now hold all of the server's plugin memory ({} MiB, plugin_memory_total_mib); retry shortly",
            self.cap_mib
        )
    }
}

impl std::error::Error for PoolExhausted {}

/// A store's resource limiter: the plugin's memory cap, with every byte of linear
/// memory also charged to the server-wide [`MemoryPool`] until the store is dropped.
///
/// The cap holds for all of a store's memories together (a component may have two), and
/// a growth the limiter allowed that then fails gives its charge back.
struct Limiter {
    cap: usize,
    charged: u64,
    /// The last growth charged, until it is known to have happened.
    pending: u64,
    pool: Arc<MemoryPool>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current) as u64;
        let total = self.charged.saturating_add(more);
        if total > self.cap as u64 || maximum.is_some_and(|m| desired > m) {
            return Err(wasmtime::Error::new(MemoryCapReached {
                cap_mib: (self.cap >> 20) as u64,
            }));
        }
        if !self.pool.try_charge(more) {
            return Err(wasmtime::Error::new(PoolExhausted {
                cap_mib: self.pool.cap() >> 20,
            }));
        }
        self.charged = total;
        self.pending = more;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        let undo = std::mem::take(&mut self.pending);
        self.charged -= undo;
        self.pool.release(undo);
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|m| desired <= m))
    }

    fn instances(&self) -> usize {
        32
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.pool.release(self.charged);
    }
}

impl Drop for PluginRuntime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.thread.get() {
            t.unpark();
        }
    }
}

/// Ticks of idleness (no plugin running) after which the epoch ticker sleeps until the
/// next plugin call, so an idle server does not wake a core a thousand times a second.
const IDLE_TICKS: u32 = 100;

/// The epoch ticker's state: how many plugin calls run, and whether it sleeps.
#[derive(Default)]
struct Ticker {
    active: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Ticker {
    /// Marks a plugin call as running until the guard drops; wakes the ticker if it sleeps.
    fn busy(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
        Busy(self.clone())
    }

    fn run(&self, engine: wasmtime::EngineWeak) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            match engine.upgrade() {
                Some(e) => e.increment_epoch(),
                None => return,
            }
            if self.active.load(Ordering::SeqCst) > 0 {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle >= IDLE_TICKS {
                // Announce the sleep before the last look: a call that starts after
                // that look sees `parked` and unparks (a token park() then consumes).
                self.parked.store(true, Ordering::SeqCst);
                if self.active.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                idle = 0;
            }
        }
    }
}

/// A plugin call in progress, for the ticker.
struct Busy(Arc<Ticker>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a plugin call failed, with the plugin's name for the message.
#[derive(Debug)]
pub enum PluginError {
    /// The plugin answered with an error of its own.
    Guest(wit::Error),
    /// The plugin trapped (panic, out-of-bounds, memory cap, ...).
    Trap { plugin: String, message: String },
    /// The plugin's own CPU budget ran out.
    CpuBudget { plugin: String, budget_ms: u64 },
    /// The request's wall-clock deadline passed.
    Deadline { plugin: String, deadline_ms: u64 },
    /// Every pooled instance slot is busy.
    Busy { plugin: String },
    /// The plugins running now hold all of the server's plugin memory.
    MemoryFull { plugin: String, message: String },
    /// The plugin answered "unavailable" after its model's queue refused a `compute`
    /// (wasi-nn has no "busy" code: the host sends `timeout`, the SDK makes it
    /// `unavailable`): the client gets the 429 a full queue gives on the tensor APIs.
    Overloaded(wit::Error),
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::Guest(e) | PluginError::Overloaded(e) => write!(f, "{}", e.message),
            PluginError::Trap { plugin, message } => write!(f, "plugin {plugin} trapped: {message}"),
            PluginError::CpuBudget { plugin, budget_ms } => write!(
                f,
                "plugin {plugin} ran out of its CPU budget of {budget_ms} ms (limits.cpu_ms of the plugin in bundle.toml)"
            ),
            PluginError::Deadline { plugin, deadline_ms } => write!(
                f,
                "request deadline of {deadline_ms} ms passed while plugin {plugin} was serving it (server --request-timeout-ms, or lower per request with the x-nnserve-timeout-ms header)"
            ),
            PluginError::Busy { plugin } => write!(
                f,
                "all plugin instance slots are busy (plugin {plugin}); retry shortly"
            ),
            PluginError::MemoryFull { plugin, message } => write!(f, "plugin {plugin}: {message}"),
        }
    }
}

/// What a store holds while one request runs.
pub struct PluginState {
    table: ResourceTable,
    wasi: WasiCtx,
    limits: Limiter,
    log: LogBudget,
    nn: NnCtx,
    host: Arc<HostInfo>,
    cpu: CpuMeter,
    cpu_budget: Duration,
    cpu_exhausted: bool,
}

/// The guest's CPU time, from the epoch callback's checks. Between two checks the guest
/// was given `allot` (a few ticks); time beyond that is time it spent waiting to run,
/// in tokio's queue after a yield or descheduled by the OS, and time in host calls
/// (`compute` waiting for its forward) is not the guest's either. Until session 4 the
/// budget was wall time minus host calls: with 64 clients on 2 busy cores a 0.6 ms JPEG
/// decode resumed after each yield already past its deadline, yielded again at once, and
/// was charged its whole wait, up to a 504 for a 200 ms budget.
#[derive(Debug, Clone)]
struct CpuMeter {
    guest: Duration,
    last: Instant,
    host_at_last: Duration,
}

/// What the epoch callback does after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The budget is spent.
    Interrupt,
    /// The guest ran its allotment: let tokio run other tasks, then go on.
    Yield,
    /// The guest mostly waited since the last check: run before yielding again.
    Run,
}

impl CpuMeter {
    fn new(now: Instant) -> CpuMeter {
        CpuMeter {
            guest: Duration::ZERO,
            last: now,
            host_at_last: Duration::ZERO,
        }
    }

    /// Charges the guest for the time since the last check, at most `allot`, less the
    /// host calls made meanwhile (`host`: their total so far).
    fn check(&mut self, now: Instant, host: Duration, allot: Duration, budget: Duration) -> Next {
        let since = now.saturating_duration_since(self.last);
        let in_host = host.saturating_sub(self.host_at_last);
        let outside = since.saturating_sub(in_host);
        self.last = now;
        self.host_at_last = host;
        self.guest += outside.min(allot);
        if self.guest >= budget {
            Next::Interrupt
        } else if outside > allot + 2 * TICK {
            Next::Run
        } else {
            Next::Yield
        }
    }

    fn left(&self, budget: Duration) -> Duration {
        budget.saturating_sub(self.guest)
    }
}

/// What the `host` interface serves: config and assets of one bundle. Assets are read
/// once at load, so requests never touch the file system.
struct HostInfo {
    plugin: String,
    config: BTreeMap<String, String>,
    assets: BTreeMap<String, Vec<u8>>,
}

/// The most asset bytes a bundle may hold (they are kept in memory).
const MAX_ASSET_BYTES: u64 = 256 << 20;

/// Reads every file under `<bundle>/assets/`, keyed by its path from the bundle root.
fn read_assets(bundle_dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let root = bundle_dir.join("assets");
    if !root.is_dir() {
        return Ok(out);
    }
    let mut total = 0u64;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path
                .strip_prefix(bundle_dir)?
                .to_string_lossy()
                .into_owned();
            // Follows symlinks only when they stay inside the bundle.
            let real = crate::bundle::resolve_inside(bundle_dir, &rel)
                .map_err(|e| anyhow::anyhow!("asset `{rel}`: {e}"))?;
            if real.is_dir() {
                stack.push(path);
            } else if real.is_file() {
                let bytes = std::fs::read(&real)?;
                total += bytes.len() as u64;
                anyhow::ensure!(
                    total <= MAX_ASSET_BYTES,
                    "the bundle's assets exceed {} MiB",
                    MAX_ASSET_BYTES >> 20
                );
                out.insert(rel, bytes);
            }
        }
    }
    Ok(out)
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_io::IoView for PluginState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

/// Log lines one request (or one router call) of a plugin may write; past it lines are
/// dropped and counted, and the count is logged once the call ends. A looping plugin
/// wrote 1.3 GB of log in 30 s before this.
pub const LOG_LINES_PER_CALL: u32 = 64;

/// The longest log line a plugin may write, bytes; longer ones are cut, with their length.
pub const LOG_LINE_BYTES: usize = 4096;

/// One call's log lines: written and dropped.
#[derive(Debug, Default)]
struct LogBudget {
    written: u32,
    dropped: u32,
}

impl PluginState {
    /// Logs, once a call ends, how many of its log lines were dropped; resets the count.
    fn flush_log(&mut self) {
        if self.log.dropped > 0 {
            tracing::warn!(
                plugin = %self.host.plugin,
                "dropped {} log lines of one call (at most {LOG_LINES_PER_CALL} per call)",
                self.log.dropped
            );
        }
        self.log = LogBudget::default();
    }
}

impl host_api::Host for PluginState {
    fn log(&mut self, level: host_api::LogLevel, message: String) -> wasmtime::Result<()> {
        if self.log.written >= LOG_LINES_PER_CALL {
            self.log.dropped += 1;
            return Ok(());
        }
        self.log.written += 1;
        // A newline in a message would forge a log line of its own: escaped.
        let message = crate::names::log_safe(&message, LOG_LINE_BYTES);
        let plugin = &self.host.plugin;
        match level {
            host_api::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            host_api::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            host_api::LogLevel::Info => tracing::info!(plugin, "{message}"),
            host_api::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            host_api::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.host.config.get(&key).cloned())
    }

    fn config_entries(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self
            .host
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn read_asset(&mut self, path: String) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let key = path.trim_start_matches("./");
        Ok(match self.host.assets.get(key) {
            Some(bytes) => Ok(bytes.clone()),
            None if !key.starts_with("assets/") => {
                Err(format!("`{path}`: only files under assets/ can be read"))
            }
            None => Err(format!("`{path}` is not a file in the bundle's assets/")),
        })
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
            .pagemap_scan(wasmtime::Enabled::Auto);
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
        })
    }

    /// All plugin memory together, as charged now.
    pub fn memory(&self) -> &Arc<MemoryPool> {
        &self.memory
    }

    /// Compiles and checks a bundle's handler plugin. Blocking (compilation takes
    /// a while): call it off the async runtime.
    pub fn load_handler(&self, bundle: &Bundle, runner: Arc<Runner>) -> anyhow::Result<Plugin> {
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
        let component = Component::from_file(&self.engine, &path).map_err(|e| {
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
            limits: spec.limits,
            host: Arc::new(HostInfo {
                plugin: name,
                config: spec.config.clone(),
                assets: read_assets(&bundle.dir)?,
            }),
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

/// What a compiled plugin of either world carries.
struct Common {
    name: String,
    limits: PluginLimits,
    host: Arc<HostInfo>,
    ticker: Arc<Ticker>,
    memory: Arc<MemoryPool>,
}

impl Common {
    /// A fresh store with the plugin's memory cap and CPU budget.
    fn store(&self, engine: &Engine, nn: NnCtx) -> Store<PluginState> {
        let cpu_budget = Duration::from_millis(self.limits.cpu_ms);
        let state = PluginState {
            table: ResourceTable::new(),
            // No preopens, no environment, no arguments; stdio goes nowhere.
            wasi: WasiCtx::builder().build(),
            limits: Limiter {
                cap: (self.limits.memory_mib as usize) << 20,
                charged: 0,
                pending: 0,
                pool: self.memory.clone(),
            },
            log: LogBudget::default(),
            nn,
            host: self.host.clone(),
            cpu: CpuMeter::new(Instant::now()),
            cpu_budget,
            cpu_exhausted: false,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(ticks(cpu_budget).min(YIELD_TICKS));
        store.epoch_deadline_callback(|mut ctx| {
            let s = ctx.data_mut();
            let allot = TICK * YIELD_TICKS as u32;
            let next = s
                .cpu
                .check(Instant::now(), s.nn.host_time, allot, s.cpu_budget);
            let delta = ticks(s.cpu.left(s.cpu_budget)).min(YIELD_TICKS);
            match next {
                Next::Interrupt => {
                    s.cpu_exhausted = true;
                    Ok(UpdateDeadline::Interrupt)
                }
                // Yield to tokio at each check so a long guest cannot hog a worker and
                // the wall-clock deadline can fire; the budget is re-checked a few ticks
                // later.
                Next::Yield => Ok(UpdateDeadline::Yield(delta)),
                Next::Run => Ok(UpdateDeadline::Continue(delta)),
            }
        });
        store
    }

    /// Re-arms a reused store for one more call: a full CPU budget from now.
    fn rearm(&self, store: &mut Store<PluginState>) {
        let s = store.data_mut();
        s.flush_log();
        s.cpu = CpuMeter::new(Instant::now());
        s.nn.host_time = Duration::ZERO;
        s.cpu_exhausted = false;
        let budget = s.cpu_budget;
        store.set_epoch_deadline(ticks(budget).min(YIELD_TICKS));
    }

    fn instantiate_error(&self, store: &Store<PluginState>, e: wasmtime::Error) -> PluginError {
        if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            PluginError::Busy {
                plugin: self.name.clone(),
            }
        } else {
            self.trap(store, e)
        }
    }

    fn trap(&self, store: &Store<PluginState>, e: wasmtime::Error) -> PluginError {
        if store.data().cpu_exhausted {
            return PluginError::CpuBudget {
                plugin: self.name.clone(),
                budget_ms: self.limits.cpu_ms,
            };
        }
        let cause = |f: &dyn Fn(&(dyn std::error::Error + 'static)) -> Option<String>| {
            e.chain().find_map(f)
        };
        if let Some(message) = cause(&|c| c.downcast_ref::<PoolExhausted>().map(|p| p.to_string()))
        {
            return PluginError::MemoryFull {
                plugin: self.name.clone(),
                message,
            };
        }
        let known = cause(&|c| {
            c.downcast_ref::<MemoryCapReached>()
                .map(|m| m.to_string())
                .or_else(|| {
                    c.downcast_ref::<crate::nn::HostMemoryExceeded>()
                        .map(|m| m.to_string())
                })
        });
        let message = match (known, e.downcast_ref::<wasmtime::Trap>()) {
            (Some(m), _) => m,
            (None, Some(trap)) => format!("{trap}"),
            (None, None) => format!("{e}"),
        };
        PluginError::Trap {
            plugin: self.name.clone(),
            message: crate::names::log_safe(&message, 1024),
        }
    }

    /// Runs `f` within the request's wall-clock `deadline`.
    async fn within<T>(
        &self,
        deadline: Duration,
        f: impl std::future::Future<Output = Result<T, PluginError>>,
    ) -> Result<T, PluginError> {
        let started = Instant::now();
        let _busy = self.ticker.busy();
        match tokio::time::timeout(deadline, f).await {
            Ok(result) => result,
            Err(_) => Err(PluginError::Deadline {
                plugin: self.name.clone(),
                deadline_ms: deadline.as_millis() as u64,
            }),
        }
        .inspect_err(|e| tracing::debug!(plugin = %self.name, elapsed = ?started.elapsed(), "plugin call failed: {e}"))
    }
}

/// A compiled, checked handler plugin of one bundle version.
pub struct Plugin {
    common: Common,
    pre: wit::HandlerPre<PluginState>,
    model_name: String,
    runner: Arc<Runner>,
}

/// A compiled, checked router plugin of one endpoint bundle version.
///
/// Unlike handlers, which get a fresh instance per request, router instances are reused:
/// instantiating costs more than a routing decision (measured in the server: about 40 us
/// against a few), and a router sees only request metadata. An instance that trapped or
/// ran out of its budget is dropped, never reused. Routers must not rely on state between
/// calls: which instance serves a call is not defined, and instances come and go.
pub struct RouterPlugin {
    common: Common,
    pre: wit::router::RouterPre<PluginState>,
    idle: std::sync::Mutex<Vec<(Store<PluginState>, wit::router::Router)>>,
}

/// Idle router instances kept per router (one per concurrent caller, up to this many).
const ROUTER_IDLE: usize = 8;

impl RouterPlugin {
    pub fn name(&self) -> &str {
        &self.common.name
    }

    /// Asks the router for a decision within its CPU budget and `deadline`.
    pub async fn route(
        &self,
        meta: &wit::router::RequestMeta,
        variants: &[wit::router::Variant],
        deadline: Duration,
    ) -> Result<wit::router::Decision, PluginError> {
        let c = &self.common;
        c.within(deadline, async {
            let reused = self.idle.lock().unwrap().pop();
            let (mut store, instance) = match reused {
                Some((mut store, instance)) => {
                    c.rearm(&mut store);
                    (store, instance)
                }
                None => {
                    let mut store = c.store(self.pre.engine(), NnCtx::none());
                    let instance = self
                        .pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(|e| c.instantiate_error(&store, e))?;
                    (store, instance)
                }
            };
            let decision = instance.call_route(&mut store, meta, variants).await;
            store.data_mut().flush_log();
            let decision = decision.map_err(|e| c.trap(&store, e))?;
            let mut idle = self.idle.lock().unwrap();
            if idle.len() < ROUTER_IDLE {
                idle.push((store, instance));
            }
            Ok(decision)
        })
        .await
    }
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.common.name
    }

    /// Serves one request in a fresh instance, within the plugin's CPU budget and the
    /// request's `deadline`.
    pub async fn handle(
        &self,
        request: wit::Request,
        deadline: Duration,
    ) -> Result<wit::Response, PluginError> {
        let c = &self.common;
        c.within(deadline, async {
            let nn = NnCtx::new(
                &self.model_name,
                self.runner.clone(),
                c.limits.host_memory_mib() << 20,
                c.memory.clone(),
            );
            let mut store = c.store(self.pre.engine(), nn);
            let instance = self
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| c.instantiate_error(&store, e))?;
            let result = instance.call_handle(&mut store, &request).await;
            store.data_mut().flush_log();
            match result {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e))
                    if e.code == wit::ErrorCode::Unavailable && store.data().nn.overloaded =>
                {
                    Err(PluginError::Overloaded(e))
                }
                Ok(Err(guest_error)) => Err(PluginError::Guest(guest_error)),
                Err(e) => Err(c.trap(&store, e)),
            }
        })
        .await
    }
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_budget_counts_the_guest_running_not_waiting() {
        let allot = TICK * YIELD_TICKS as u32;
        let budget = Duration::from_millis(20);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // A guest that runs without pause is charged every check in full and stopped.
        let mut m = CpuMeter::new(t0);
        assert_eq!(m.check(ms(5), Duration::ZERO, allot, budget), Next::Yield);
        assert_eq!(m.check(ms(10), Duration::ZERO, allot, budget), Next::Yield);
        assert_eq!(m.check(ms(15), Duration::ZERO, allot, budget), Next::Yield);
        assert_eq!(
            m.check(ms(20), Duration::ZERO, allot, budget),
            Next::Interrupt
        );
        // One that waited 300 ms for a core after a yield is charged its allotment at
        // most, and runs before it yields again.
        let mut m = CpuMeter::new(t0);
        assert_eq!(m.check(ms(5), Duration::ZERO, allot, budget), Next::Yield);
        assert_eq!(m.check(ms(305), Duration::ZERO, allot, budget), Next::Run);
        assert_eq!(m.guest, Duration::from_millis(10));
        // Time in host calls (compute waiting for its forward) is not the guest's.
        let mut m = CpuMeter::new(t0);
        let next = m.check(ms(1003), Duration::from_millis(1000), allot, budget);
        assert_eq!((next, m.guest), (Next::Yield, Duration::from_millis(3)));
    }

    #[test]
    fn the_plugin_memory_pool_refuses_past_its_cap_and_takes_releases() {
        let pool = MemoryPool::new(100);
        assert!(pool.try_charge(60));
        assert!(!pool.try_charge(41), "over the cap");
        assert_eq!(pool.used(), 60, "a refusal charges nothing");
        assert!(pool.try_charge(40));
        pool.release(60);
        assert!(pool.try_charge(60));
    }

    #[test]
    fn assets_are_read_once_keyed_from_the_bundle_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("assets/sub")).unwrap();
        std::fs::write(dir.path().join("assets/labels.txt"), "a\nb").unwrap();
        std::fs::write(dir.path().join("assets/sub/vocab.txt"), "x").unwrap();
        std::fs::write(dir.path().join("bundle.toml"), "not an asset").unwrap();
        let assets = read_assets(dir.path()).unwrap();
        let keys: Vec<&str> = assets.keys().map(String::as_str).collect();
        assert_eq!(keys, ["assets/labels.txt", "assets/sub/vocab.txt"]);
        assert_eq!(assets["assets/labels.txt"], b"a\nb");
    }

    #[test]
    fn an_asset_symlink_out_of_the_bundle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("assets")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("assets/evil")).unwrap();
        let err = read_assets(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("asset `assets/evil`") && err.contains("outside"),
            "{err}"
        );
    }

    #[test]
    fn only_granted_interfaces_pass_the_import_check() {
        let granted = |n: &str| GRANTED.iter().any(|g| n.starts_with(g));
        assert!(granted("wasi:io/streams@0.2.6"));
        assert!(granted("wasi:nn/inference@0.2.0-rc-2024-10-28"));
        assert!(granted("nnserve:plugin/host@0.1.0"));
        assert!(!granted("wasi:sockets/tcp@0.2.6"));
        assert!(!granted("wasi:http/outgoing-handler@0.2.6"));
        assert!(!granted("nnserve:plugin/other@0.1.0"));
    }
}
