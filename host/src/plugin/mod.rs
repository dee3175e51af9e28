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
//!   calls such as `compute` (`limits::CpuMeter`: waiting for a core is not running);
//! - the request's wall-clock deadline, over everything (queueing and forward too).
//!
//! It is split along its seams:
//!
//! - `engine`: the `Engine`, the `Linker` and its grants, compiling and checking a component;
//! - `limits`: the memory cap, the CPU meter and the epoch ticker;
//! - `host`: the store's state and the `host` interface (log, config, assets);
//! - `instances`: handler and router plugins serving calls, and [`PluginError`];
//! - `output`: a call's stdout and stderr, to the debug log;
//! - `calls`: the small types `api` and `routing` exchange with plugins ([`HttpRequest`],
//!   [`RouteVariant`], [`Decision`], ...): the generated WIT types stay in here.
//!
//! The server-wide [`MemoryPool`] lives in `nn`, whose host memory it also charges, so that
//! `nn` never reaches up into `plugin`; it is re-exported here.
//!
//! This module must not reach into HTTP (`api` maps [`PluginError`] to statuses), into the
//! registry of loaded versions (`lifecycle`) or into routing policy (`routing`): it runs
//! the components it is given.

mod calls;
mod engine;
mod host;
mod instances;
mod limits;
mod output;
mod preinit;

pub use self::calls::{
    Decision, GuestCode, GuestError, HttpRequest, HttpResponse, RouteRequest, RouteVariant,
    VariantStats,
};
pub use self::engine::{
    describe, initial_memory_bytes, refused_imports, ComponentInfo, PluginRuntime, RuntimeConfig,
    INITIAL_MEMORY_FLAG, SMALL_INITIAL_MEMORY,
};
pub use self::host::{PluginState, LOG_LINES_PER_CALL, LOG_LINE_BYTES};
pub use self::instances::{Plugin, PluginError, RouterPlugin};
pub use self::limits::MemoryCapReached;
pub use crate::nn::{MemoryPool, PoolExhausted};

#[cfg(test)]
mod tests;
