//! Endpoints: variants of models behind a router plugin (A/B tests, canaries, bandits).
//!
//! An endpoint bundle (`[endpoint]`, `[[variants]]`, `[router]`) is loaded like a model
//! bundle and lives in the same registry, under its own name. A request to the endpoint
//! without an explicit version goes through [`route`]: the variants that resolve to an
//! AVAILABLE model version (`api` resolves them through the registry and passes them in
//! as [`Candidate`]s, so this module never reaches into the model's life) are handed to the router with their weights and live stats
//! ([`StatsBook`]); the router names the variant that answers and, optionally, shadow
//! variants that get a copy. When the router fails (trap, CPU budget, unknown variant),
//! the endpoint's `on_router_error` decides: the default variant answers (fail-open)
//! or the client gets a 503 (fail-closed). Either way the failure is counted in
//! `nnserve_router_errors_total` and logged with the plugin's name.
//!
//! This module decides; `api` runs the chosen variant and reports back through
//! [`InFlight`], so the live stats see every answer.

use crate::bundle::{Bundle, EndpointSpec, RouterErrorPolicy, VariantSpec};
use crate::metrics::Metrics;
use crate::plugin::{
    PluginError, PluginRuntime, RouteRequest, RouteVariant, RouterPlugin, VariantStats as Figures,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A loaded endpoint version: its variants and its compiled router.
pub struct Endpoint {
    pub name: String,
    pub spec: EndpointSpec,
    pub variants: Vec<VariantSpec>,
    pub router: RouterPlugin,
    /// The variant that answers when the router fails open.
    pub default_variant: String,
}

impl Endpoint {
    /// Compiles the router of an endpoint bundle. Blocking.
    pub fn load(bundle: &Bundle, runtime: &PluginRuntime) -> anyhow::Result<Endpoint> {
        let m = &bundle.manifest;
        let spec = m.endpoint.clone().expect("checked: an endpoint bundle");
        let router = runtime.load_router(bundle)?;
        let default_variant = spec
            .default_variant
            .clone()
            .unwrap_or_else(|| m.variants[0].name().to_string());
        Ok(Endpoint {
            name: bundle.name().to_string(),
            spec,
            variants: m.variants.clone(),
            router,
            default_variant,
        })
    }

    fn variant(&self, name: &str) -> Option<&VariantSpec> {
        self.variants.iter().find(|v| v.name() == name)
    }

    /// The default variant: what the endpoint's metadata and ready routes describe, and
    /// what answers when the router fails open.
    pub fn default(&self) -> &VariantSpec {
        self.variant(&self.default_variant)
            .expect("checked: default_variant names a variant")
    }
}

/// A variant that resolves to an available model version now, as the caller resolved
/// it; `target` is the caller's handle to that version.
pub struct Candidate<'a, T> {
    pub variant: &'a VariantSpec,
    pub version: u64,
    pub queue_depth: usize,
    pub target: T,
}

/// Where a request goes.
pub struct Routed<T> {
    pub variant: String,
    pub target: T,
    /// Variants that get a copy of the request.
    pub shadows: Vec<(String, T)>,
    /// Why the router chose so, or why the default variant serves.
    pub reason: Option<String>,
}

/// Why an endpoint could not route a request; the server keeps serving.
#[derive(Debug)]
pub enum RouteError {
    /// No variant resolves to an available model version (503).
    NoVariant(String),
    /// The router failed and the endpoint fails closed (503).
    RouterFailed(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NoVariant(m) | RouteError::RouterFailed(m) => f.write_str(m),
        }
    }
}

/// The request as the router sees it.
pub struct Meta {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// Asks the endpoint's router where this request goes, among `available` (the variants
/// that resolve now); `missing` says why the others do not.
#[allow(clippy::too_many_arguments)]
pub async fn route<T: Clone>(
    endpoint: &Endpoint,
    available: Vec<Candidate<'_, T>>,
    missing: Vec<String>,
    book: &StatsBook,
    metrics: &Metrics,
    meta: Meta,
    deadline: Duration,
) -> Result<Routed<T>, RouteError> {
    if available.is_empty() {
        metrics.router_error(&endpoint.name, endpoint.router.name(), "no_variant");
        return Err(RouteError::NoVariant(format!(
            "endpoint '{}' has no available variant ({})",
            endpoint.name,
            missing.join("; ")
        )));
    }
    let window = Duration::from_millis(endpoint.spec.stats_window_ms);
    let variants: Vec<RouteVariant> = available
        .iter()
        .map(|c| {
            let v = c.variant;
            let stats = book.get(&endpoint.name, v.name(), window);
            RouteVariant {
                name: v.name().to_string(),
                model: v.model.clone(),
                version: c.version,
                label: v.label.clone(),
                weight: v.weight,
                stats: stats.snapshot(c.queue_depth),
            }
        })
        .collect();
    let routing_key = endpoint.spec.routing_key_header.as_ref().and_then(|h| {
        meta.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(h))
            .map(|(_, v)| v.clone())
    });
    let request = RouteRequest {
        method: meta.method,
        path: meta.path,
        headers: meta.headers,
        routing_key,
    };
    let started = Instant::now();
    let decision = endpoint.router.route(request, variants, deadline).await;
    metrics.router_call(&endpoint.name, started.elapsed());

    let find = |name: &str| {
        available
            .iter()
            .find(|c| c.variant.name() == name)
            .map(|c| (c.variant, &c.target))
    };
    let failure = match decision {
        Ok(d) => match find(&d.variant) {
            Some((v, s)) => {
                let shadows = d
                    .shadows
                    .iter()
                    .filter(|name| name.as_str() != d.variant)
                    .filter_map(|name| find(name))
                    .map(|(v, s)| (v.name().to_string(), s.clone()))
                    .collect();
                return Ok(Routed {
                    variant: v.name().to_string(),
                    target: s.clone(),
                    shadows,
                    reason: d.reason,
                });
            }
            None => (
                "unknown_variant",
                format!(
                    "router {} chose variant '{}', which is not one of the available variants ({})",
                    endpoint.router.name(),
                    d.variant,
                    available
                        .iter()
                        .map(|c| c.variant.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        },
        Err(e) => {
            let reason = match e {
                PluginError::CpuBudget { .. } => "cpu_budget",
                PluginError::Deadline { .. } => "deadline",
                PluginError::Busy { .. } | PluginError::MemoryFull { .. } => "busy",
                PluginError::Trap { .. }
                | PluginError::Panic { .. }
                | PluginError::Guest(_)
                | PluginError::Overloaded(_) => "trap",
            };
            (reason, e.to_string())
        }
    };
    let (reason, message) = failure;
    metrics.router_error(&endpoint.name, endpoint.router.name(), reason);
    match endpoint.spec.on_router_error {
        RouterErrorPolicy::FailClosed => {
            tracing::warn!(endpoint = %endpoint.name, plugin = endpoint.router.name(), "router failed; failing closed: {message}");
            Err(RouteError::RouterFailed(format!(
                "endpoint '{}' cannot route this request: {message} (on_router_error = \"fail-closed\")",
                endpoint.name
            )))
        }
        RouterErrorPolicy::FailOpen => {
            tracing::warn!(endpoint = %endpoint.name, plugin = endpoint.router.name(), default = %endpoint.default_variant, "router failed; serving the default variant: {message}");
            match find(&endpoint.default_variant) {
                Some((v, s)) => Ok(Routed {
                    variant: v.name().to_string(),
                    target: s.clone(),
                    shadows: Vec::new(),
                    reason: Some(format!("router failed ({reason}); default variant")),
                }),
                None => Err(RouteError::RouterFailed(format!(
                    "endpoint '{}': the router failed ({message}) and the default variant '{}' is not available",
                    endpoint.name, endpoint.default_variant
                ))),
            }
        }
    }
}

/// Live stats of every (endpoint, variant), kept across versions of the endpoint so a
/// router swap does not forget what the variants did.
#[derive(Default)]
pub struct StatsBook {
    map: RwLock<HashMap<(String, String), Arc<VariantStats>>>,
}

impl StatsBook {
    pub fn get(&self, endpoint: &str, variant: &str, window: Duration) -> Arc<VariantStats> {
        let key = (endpoint.to_string(), variant.to_string());
        if let Some(s) = self.map.read().unwrap().get(&key) {
            if s.window == window {
                return s.clone();
            }
        }
        let mut map = self.map.write().unwrap();
        let entry = map
            .entry(key)
            .or_insert_with(|| Arc::new(VariantStats::new(window)));
        if entry.window != window {
            // The endpoint's new version changed the window: start afresh.
            *entry = Arc::new(VariantStats::new(window));
        }
        entry.clone()
    }
}

/// Slots of a window: finer slots age out more smoothly, and cost more to sum.
const SLOTS: usize = 10;
/// Latency buckets: four per octave from 1 us, up to about 17 s.
const BUCKETS: usize = 96;

/// One variant's live figures: requests in flight, and a sliding window of latencies
/// and errors (a ring of time slots, each a small log-scale histogram).
pub struct VariantStats {
    window: Duration,
    in_flight: AtomicU32,
    slots: Mutex<Vec<Slot>>,
    born: Instant,
}

#[derive(Clone)]
struct Slot {
    /// Which slot of time this is (elapsed / slot length); stale slots are reset.
    index: u64,
    count: u64,
    errors: u64,
    hist: [u32; BUCKETS],
}

impl VariantStats {
    fn new(window: Duration) -> VariantStats {
        VariantStats {
            window,
            in_flight: AtomicU32::new(0),
            slots: Mutex::new(vec![
                Slot {
                    index: u64::MAX,
                    count: 0,
                    errors: 0,
                    hist: [0; BUCKETS],
                };
                SLOTS
            ]),
            born: Instant::now(),
        }
    }

    fn slot_index(&self) -> u64 {
        let slot = (self.window.as_micros() as u64 / SLOTS as u64).max(1);
        self.born.elapsed().as_micros() as u64 / slot
    }

    /// Requests to this variant that have not finished.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard records it when it ends.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: self.clone(),
            started: Instant::now(),
        }
    }

    fn record(&self, took: Duration, error: bool) {
        let now = self.slot_index();
        let mut slots = self.slots.lock().unwrap();
        let slot = &mut slots[(now % SLOTS as u64) as usize];
        if slot.index != now {
            slot.index = now;
            slot.count = 0;
            slot.errors = 0;
            slot.hist = [0; BUCKETS];
        }
        slot.count += 1;
        slot.errors += error as u64;
        slot.hist[bucket(took)] += 1;
    }

    /// The figures handed to a router.
    pub fn snapshot(&self, queue_depth: usize) -> Figures {
        let now = self.slot_index();
        let slots = self.slots.lock().unwrap();
        let mut hist = [0u64; BUCKETS];
        let (mut count, mut errors) = (0u64, 0u64);
        for s in slots
            .iter()
            .filter(|s| s.index <= now && now - s.index < SLOTS as u64)
        {
            count += s.count;
            errors += s.errors;
            for (h, &x) in hist.iter_mut().zip(s.hist.iter()) {
                *h += x as u64;
            }
        }
        drop(slots);
        Figures {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queue_depth: queue_depth.min(u32::MAX as usize) as u32,
            requests: count,
            p50_us: percentile(&hist, count, 0.50),
            p99_us: percentile(&hist, count, 0.99),
            error_rate: if count == 0 {
                0.0
            } else {
                errors as f64 / count as f64
            },
        }
    }
}

/// The bucket of a latency: `floor(4 * log2(us))`, clamped.
fn bucket(d: Duration) -> usize {
    let us = d.as_micros().max(1) as f64;
    ((us.log2() * 4.0) as usize).min(BUCKETS - 1)
}

/// The upper bound (us) of the bucket holding the `q` quantile; 0 for no data.
fn percentile(hist: &[u64; BUCKETS], count: u64, q: f64) -> u64 {
    if count == 0 {
        return 0;
    }
    let rank = ((count as f64 * q).ceil() as u64).clamp(1, count);
    let mut acc = 0;
    for (i, &n) in hist.iter().enumerate() {
        acc += n;
        if acc >= rank {
            return 2f64.powf((i + 1) as f64 / 4.0).round() as u64;
        }
    }
    u64::MAX
}

/// A request in flight to a variant. [`InFlight::finish`] records its outcome; a guard
/// dropped without it (the client went away) counts as not finished, not as an error.
pub struct InFlight {
    stats: Arc<VariantStats>,
    started: Instant,
}

impl InFlight {
    /// Records the answer: `server_error` for a 5xx.
    pub fn finish(self, server_error: bool) {
        self.stats.record(self.started.elapsed(), server_error);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_gives_percentiles_and_error_rate() {
        let s = Arc::new(VariantStats::new(Duration::from_secs(10)));
        for i in 0..100u64 {
            let guard = s.start();
            s.record(Duration::from_micros(100 + i * 10), i % 10 == 0);
            drop(guard);
        }
        let snap = s.snapshot(3);
        assert_eq!(snap.requests, 100);
        assert!((snap.error_rate - 0.1).abs() < 1e-9);
        assert_eq!(snap.queue_depth, 3);
        assert_eq!(snap.in_flight, 0);
        // True p50 is about 595 us and p99 about 1090 us; buckets are 19% wide.
        assert!((550..=720).contains(&snap.p50_us), "{}", snap.p50_us);
        assert!((1000..=1300).contains(&snap.p99_us), "{}", snap.p99_us);
    }

    #[test]
    fn old_slots_age_out_and_in_flight_counts() {
        let s = Arc::new(VariantStats::new(Duration::from_millis(50)));
        let g = s.start();
        assert_eq!(s.snapshot(0).in_flight, 1);
        g.finish(true);
        let snap = s.snapshot(0);
        assert_eq!((snap.requests, snap.in_flight), (1, 0));
        assert_eq!(snap.error_rate, 1.0);
        std::thread::sleep(Duration::from_millis(80));
        let snap = s.snapshot(0);
        assert_eq!((snap.requests, snap.p50_us, snap.error_rate), (0, 0, 0.0));
    }

    #[test]
    fn a_book_keeps_stats_per_variant_until_the_window_changes() {
        let book = StatsBook::default();
        let a = book.get("ab", "a", Duration::from_secs(1));
        a.start().finish(false);
        let again = book.get("ab", "a", Duration::from_secs(1));
        assert_eq!(again.snapshot(0).requests, 1);
        assert_eq!(
            book.get("ab", "b", Duration::from_secs(1))
                .snapshot(0)
                .requests,
            0
        );
        assert_eq!(
            book.get("ab", "a", Duration::from_secs(2))
                .snapshot(0)
                .requests,
            0
        );
    }
}
