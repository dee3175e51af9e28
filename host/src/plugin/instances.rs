//! Compiled plugins serving calls: [`Plugin`] (a handler, a fresh instance per request)
//! and [`RouterPlugin`] (reused router instances), each call in a fresh or re-armed
//! `Store` within the plugin's CPU budget and the request's deadline, and what went
//! wrong as a [`PluginError`].
//!
//! It must not reach into HTTP: `api` maps [`PluginError`] to statuses.

use super::calls::{
    Decision, GuestCode, GuestError, HttpRequest, HttpResponse, RouteRequest, RouteVariant,
};
use super::host::{HostInfo, LogBudget, PluginState};
use super::limits::{ticks, CpuMeter, Limiter, MemoryCapReached, Next, Ticker, TICK, YIELD_TICKS};
use crate::bundle::PluginLimits;
use crate::nn::{Blame, Dependencies, MemoryPool, NnCtx, PoolExhausted, Runner};
use crate::wit;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

/// Why a plugin call failed, with the plugin's name for the message.
#[derive(Debug)]
pub enum PluginError {
    /// The plugin answered with an error of its own.
    Guest(GuestError),
    /// The plugin trapped (out-of-bounds, memory cap, a panic without the SDK's hook...).
    Trap { plugin: String, message: String },
    /// The plugin panicked, and the SDK's hook said why: `message` is the panic's first
    /// line, shortened, without its location (the log has them whole).
    Panic { plugin: String, message: String },
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
    Overloaded(GuestError),
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::Guest(e) | PluginError::Overloaded(e) => write!(f, "{}", e.message),
            PluginError::Trap { plugin, message } => write!(f, "plugin {plugin} trapped: {message}"),
            PluginError::Panic { plugin, message } => write!(f, "plugin {plugin} panicked: {message}"),
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

/// What a compiled plugin of either world carries.
#[derive(Clone)]
pub(super) struct Common {
    pub(super) name: String,
    /// `[handler] init = true`: run `init` once at load and serve from its snapshot.
    pub(super) init: bool,
    pub(super) limits: PluginLimits,
    pub(super) host: Arc<HostInfo>,
    pub(super) ticker: Arc<Ticker>,
    pub(super) memory: Arc<MemoryPool>,
}

impl Common {
    /// A fresh store with the plugin's memory cap and CPU budget.
    pub(super) fn store(&self, engine: &Engine, nn: NnCtx) -> Store<PluginState> {
        let cpu_budget = Duration::from_millis(self.limits.cpu_ms);
        let output = super::output::Output::wanted().then(super::output::Output::default);
        let state = PluginState {
            table: ResourceTable::new(),
            // No preopens, no environment, no arguments; stdout and stderr go to the
            // debug log when it is on (`output`), else nowhere.
            wasi: match &output {
                Some(o) => WasiCtx::builder()
                    .stdout(o.stdout.clone())
                    .stderr(o.stderr.clone())
                    .build(),
                None => WasiCtx::builder().build(),
            },
            output,
            panic: None,
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
        s.panic = None;
        s.cpu = CpuMeter::new(Instant::now());
        s.nn.host_time = Duration::ZERO;
        s.cpu_exhausted = false;
        let budget = s.cpu_budget;
        store.set_epoch_deadline(ticks(budget).min(YIELD_TICKS));
    }

    pub(super) fn instantiate_error(
        &self,
        store: &Store<PluginState>,
        e: wasmtime::Error,
    ) -> PluginError {
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

    pub(super) fn trap(&self, store: &Store<PluginState>, e: wasmtime::Error) -> PluginError {
        if store.data().cpu_exhausted {
            return PluginError::CpuBudget {
                plugin: self.name.clone(),
                budget_ms: self.limits.cpu_ms,
            };
        }
        if let Some((message, location)) = &store.data().panic {
            tracing::error!(
                plugin = %self.name,
                location = location.as_deref().unwrap_or("unknown"),
                "plugin panicked: {message}"
            );
            return PluginError::Panic {
                plugin: self.name.clone(),
                message: short_panic(message),
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

/// What a client sees of a panic: its first line, at most 200 characters.
fn short_panic(message: &str) -> String {
    let first = message.lines().next().unwrap_or("");
    if first.chars().count() > 200 {
        format!("{}…", first.chars().take(200).collect::<String>())
    } else {
        first.to_string()
    }
}

/// A compiled, checked handler plugin of one bundle version.
pub struct Plugin {
    pub(super) common: Common,
    pub(super) pre: wit::HandlerPre<PluginState>,
    pub(super) model_name: String,
    /// `None` for a model-less handler bundle.
    pub(super) runner: Option<Arc<Runner>>,
    /// The other models it declared (`[handler] dependencies`), if any.
    pub(super) deps: Option<Dependencies>,
}

/// A compiled, checked router plugin of one endpoint bundle version.
///
/// Unlike handlers, which get a fresh instance per request, router instances are reused:
/// instantiating costs more than a routing decision (measured in the server: about 40 us
/// against a few), and a router sees only request metadata. An instance that trapped or
/// ran out of its budget is dropped, never reused. Routers must not rely on state between
/// calls: which instance serves a call is not defined, and instances come and go.
pub struct RouterPlugin {
    pub(super) common: Common,
    pub(super) pre: wit::router::RouterPre<PluginState>,
    pub(super) idle: std::sync::Mutex<Vec<(Store<PluginState>, wit::router::Router)>>,
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
        meta: RouteRequest,
        variants: Vec<RouteVariant>,
        deadline: Duration,
    ) -> Result<Decision, PluginError> {
        let c = &self.common;
        let meta = wit::router::RequestMeta::from(meta);
        let variants: Vec<wit::router::Variant> = variants.into_iter().map(Into::into).collect();
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
            let decision = instance.call_route(&mut store, &meta, &variants).await;
            store.data_mut().flush_log();
            let decision = decision.map_err(|e| c.trap(&store, e))?;
            let mut idle = self.idle.lock().unwrap();
            if idle.len() < ROUTER_IDLE {
                idle.push((store, instance));
            }
            Ok(decision.into())
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
        request: HttpRequest,
        deadline: Duration,
    ) -> Result<HttpResponse, PluginError> {
        let request = wit::Request::from(request);
        let c = &self.common;
        c.within(deadline, async {
            let nn = NnCtx::new(
                &self.model_name,
                self.runner.clone(),
                self.deps.clone(),
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
                Ok(Ok(response)) => Ok(response.into()),
                Ok(Err(e))
                    if e.code == wit::ErrorCode::Unavailable && store.data().nn.overloaded =>
                {
                    Err(PluginError::Overloaded(e.into()))
                }
                Ok(Err(guest_error)) => {
                    let guest_error: GuestError = guest_error.into();
                    Err(PluginError::Guest(match store.data_mut().nn.blame.take() {
                        // The model refused a tensor the plugin built: the plugin's bug
                        // (it should have checked the request), a 500 that names it.
                        Some(Blame::Refused(refused)) => GuestError {
                            code: GuestCode::Internal,
                            message: format!(
                                "plugin {} gave its model an input it refuses ({refused}); \
                                 the plugin must check the request and answer 400 itself",
                                c.name
                            ),
                        },
                        Some(Blame::Undeclared(why)) => GuestError {
                            code: GuestCode::Internal,
                            message: format!("plugin {}: {why}", c.name),
                        },
                        // Not the plugin's fault nor the client's: a 503 to retry.
                        Some(Blame::DependencyDown(why)) => GuestError {
                            code: GuestCode::Unavailable,
                            message: format!("plugin {}: {why}", c.name),
                        },
                        // The plugin's own failure: its 500 names it.
                        None if guest_error.code == GuestCode::Internal => GuestError {
                            code: GuestCode::Internal,
                            message: format!("plugin {}: {}", c.name, guest_error.message),
                        },
                        None => guest_error,
                    }))
                }
                Err(e) => Err(c.trap(&store, e)),
            }
        })
        .await
    }
}
