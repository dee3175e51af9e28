//! One-time setup of a handler plugin: when its bundle says `[handler] init = true` and
//! its component exports `init` (world `handler-with-init`, which the SDK builds), the
//! host runs `init` once at load in an instance of its own and snapshots that instance
//! with Wizer (`wasmtime-wizer`, the Bytecode Alliance's pre-initializer, as a library).
//! The snapshot, a component whose data segments and globals are the memory `init` left,
//! is what every request instantiates from then on.
//!
//! Why this is safe: each request still gets a fresh instance, now of the snapshot, so
//! nothing one request does reaches another; the snapshot holds only what `init` computed
//! from the bundle (its config and assets), never a request. `init` runs with no model
//! (its wasi-nn `load-by-name` finds nothing), so the snapshot holds no host resource: a
//! resource handle would dangle in a new instance. Wizer snapshots memories and globals,
//! not tables; Rust code keeps function pointers as indices into the table that the
//! component's own element segments fill, the same in every instance.
//!
//! Measured on the text-embedder (all-MiniLM-L6-v2, 2 cores): a one-sentence request took
//! 33 ms at p50 when every request parsed the 0.5 MB tokenizer.json, 12 ms from the
//! snapshot; the load pays 2.8 s once (two compiles of the 2.8 MB plugin and `init`),
//! and the snapshot is 7.9 MB. Host-side caching could not help here: the parsed
//! tokenizer is guest memory, and handing it over per request would be the same copy
//! that a snapshot's copy-on-write mapping avoids.

use super::calls::GuestError;
use super::engine::PluginRuntime;
use super::instances::{Common, PluginError};
use crate::nn::NnCtx;
use wasmtime::component::{Component, Instance, Lift, WasmList};
use wasmtime::Store;

/// The export `init` runs from (`handler-with-init` in wit/plugin.wit).
pub(super) const INIT_EXPORT: &str = "init";

/// CPU time `init` may use: it runs once, at load, and may do more than a request.
const INIT_CPU_MS: u64 = 30_000;

impl PluginRuntime {
    /// The component every request instantiates: `component` itself, or, when it exports
    /// `init`, its snapshot after `init` ran. Blocking.
    pub(super) fn preinit(
        &self,
        wasm: &[u8],
        component: Component,
        common: &Common,
    ) -> anyhow::Result<Component> {
        if !common.init {
            return Ok(component);
        }
        if component.get_export_index(None, INIT_EXPORT).is_none() {
            anyhow::bail!(
                "[handler] init = true, but the plugin exports no `init` (implement \
                 Handler::init with an nnserve-sdk that has it, or export `init: func()`)"
            );
        }
        let started = std::time::Instant::now();
        let mut wizer = wasmtime_wizer::Wizer::new();
        // Kept: the component still lifts `init` (dropping only the core export would
        // leave it dangling); nothing calls it again.
        wizer.init_func(INIT_EXPORT).keep_init_func(true);
        let (cx, instrumented) = wizer
            .instrument_component(wasm)
            .map_err(|e| anyhow::anyhow!("cannot prepare its init for a snapshot: {e:#}"))?;
        let engine = self.engine();
        let instrumented = Component::new(engine, &instrumented)
            .map_err(|e| anyhow::anyhow!("cannot compile it for its init: {e:#}"))?;
        let limits = crate::bundle::PluginLimits {
            cpu_ms: INIT_CPU_MS.max(common.limits.cpu_ms),
            ..common.limits
        };
        let init_common = Common {
            limits,
            ..common.clone()
        };
        let mut store = init_common.store(engine, NnCtx::none());
        let snapshot = futures::executor::block_on(async {
            let instance = self
                .linker()
                .instantiate_async(&mut store, &instrumented)
                .await
                .map_err(|e| init_common.instantiate_error(&store, e))?;
            let init = instance
                .get_func(&mut store, INIT_EXPORT)
                .expect("checked above: the component exports init");
            let called = init.call_async(&mut store, &[], &mut []).await;
            store.data_mut().flush_log();
            called.map_err(|e| init_common.trap(&store, e))?;
            wizer
                .snapshot_component(
                    &cx,
                    &mut Snapshotted {
                        store: &mut store,
                        instance,
                    },
                )
                .await
                .map_err(|e| {
                    PluginError::Guest(GuestError {
                        code: super::calls::GuestCode::Internal,
                        message: format!("its state after init cannot be snapshotted: {e:#}"),
                    })
                })
        })
        .map_err(|e| anyhow::anyhow!("init failed: {e}"))?;
        let component = Component::new(engine, &snapshot)
            .map_err(|e| anyhow::anyhow!("cannot compile its snapshot after init: {e:#}"))?;
        tracing::info!(
            plugin = %common.name,
            took_ms = started.elapsed().as_millis() as u64,
            snapshot_kib = snapshot.len() >> 10,
            "ran the plugin's init once and serves from its snapshot"
        );
        Ok(component)
    }
}

/// What Wizer reads the state of an instance through: the accessor functions that its
/// instrumentation exported, called on our own store.
struct Snapshotted<'a, T: 'static> {
    store: &'a mut Store<T>,
    instance: Instance,
}

impl<T: Send> Snapshotted<'_, T> {
    async fn call<R: Lift + Send + Sync + 'static, R2>(
        &mut self,
        instance: &str,
        func: &str,
        use_ret: impl FnOnce(&mut Store<T>, R) -> R2,
    ) -> R2 {
        // The instrumented component exports these accessors; their absence would be a
        // Wizer bug, not the plugin's.
        let (_, parent) = self
            .instance
            .get_export(&mut *self.store, None, instance)
            .expect("Wizer's instrumentation exports its accessor instance");
        let (_, index) = self
            .instance
            .get_export(&mut *self.store, Some(&parent), func)
            .expect("Wizer's accessor instance exports its functions");
        let f = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, index)
            .expect("Wizer's accessors have the types it instruments");
        let (ret,) = f
            .call_async(&mut *self.store, ())
            .await
            .expect("a Wizer accessor only reads state");
        use_ret(&mut *self.store, ret)
    }
}

impl<T: Send> wasmtime_wizer::ComponentInstanceState for Snapshotted<'_, T> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        self.call(instance, func, |store, list: WasmList<u8>| {
            contents(list.as_le_slice(&store))
        })
        .await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, r: f32| r.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, r: f64| r.to_bits()).await
    }
}
