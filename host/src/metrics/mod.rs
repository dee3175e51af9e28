//! Prometheus metrics (crate `prometheus-client`), served at `GET /metrics` in the
//! OpenMetrics text format that Prometheus scrapes.
//!
//! Per model and version: requests by outcome, request latency, time queued before the
//! forward, forward time, the formed batch size (`nnserve_batch_size`), queue depth; and
//! the number of versions in each state. Other modules get small handles
//! ([`VersionMetrics`]) and never see the registry.

mod plugin_pool;
mod process;

pub use plugin_pool::PluginPoolCollector;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub model: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub model: String,
    pub version: String,
    /// `ok`, `client_error`, `server_error`, `overload` or `timeout`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub model: String,
    pub version: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantLabels {
    pub endpoint: String,
    pub variant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantOutcomeLabels {
    pub endpoint: String,
    pub variant: String,
    /// As for `nnserve_requests_total`; for shadow copies also `dropped`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouterErrorLabels {
    pub endpoint: String,
    pub plugin: String,
    /// `trap`, `cpu_budget`, `deadline`, `busy`, `unknown_variant` or `no_variant`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// Every value of the `outcome` label of `nnserve_requests_total` (the API's errors map
/// onto these; a unit test there checks it).
pub const OUTCOMES: [&str; 6] = [
    "ok",
    "client_error",
    "server_error",
    "overload",
    "timeout",
    "cancelled",
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 10 us .. about 84 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 24))
}

fn batch_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

/// The process's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Without the `nnserve_` prefix: `process_*`, as every Prometheus client names them.
    process: Registry,
    requests: Family<OutcomeLabels, Counter>,
    latency: HistogramFamily<VersionLabels>,
    queue_time: HistogramFamily<VersionLabels>,
    compute_time: HistogramFamily<VersionLabels>,
    batch_size: HistogramFamily<VersionLabels>,
    padding: Family<VersionLabels, Counter>,
    queue_depth: Family<VersionLabels, Gauge>,
    versions: Family<StateLabels, Gauge>,
    variant_requests: Family<VariantOutcomeLabels, Counter>,
    variant_latency: HistogramFamily<VariantLabels>,
    shadow_requests: Family<VariantOutcomeLabels, Counter>,
    router_errors: Family<RouterErrorLabels, Counter>,
    router_time: HistogramFamily<EndpointLabels>,
    api_requests: Family<ProtocolLabels, Counter>,
}

/// The handles one loaded version records into.
#[derive(Clone, Default)]
pub struct VersionMetrics {
    /// Rows per formed batch, before padding.
    pub batch_size: Option<Histogram>,
    /// Zero rows added by padding to allowed batch sizes.
    pub padding_rows: Option<Counter>,
    /// Seconds from entering the queue to the start of the forward.
    pub queue_time: Option<Histogram>,
    /// Seconds of the forward.
    pub compute_time: Option<Histogram>,
    /// Requests waiting for the forward: in the batcher's queue, or without batching
    /// for a forward slot.
    pub queue_depth: Option<Gauge>,
    /// `nnserve_requests_total{outcome="ok"}` and the latency histogram of this version,
    /// held so a successful request records without a label lookup.
    pub requests_ok: Option<Counter>,
    pub latency: Option<Histogram>,
    /// The version's own counts, for Triton's statistics (gRPC `ModelStatistics`).
    pub counts: std::sync::Arc<InferCounts>,
}

/// A version's finished requests and their time, and when the last one ended: what
/// Triton's `ModelStatistics` reports as `success`, `fail` and `last_inference`.
#[derive(Default, Debug)]
pub struct InferCounts {
    pub ok: AtomicU64,
    pub ok_ns: AtomicU64,
    pub failed: AtomicU64,
    pub failed_ns: AtomicU64,
    /// Milliseconds since the Unix epoch; 0 before the first request.
    pub last_ms: AtomicU64,
    /// Waits for a forward, and forwards (one per batch), with their time.
    pub queued: AtomicU64,
    pub queued_ns: AtomicU64,
    pub forwards: AtomicU64,
    pub forwards_ns: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl InferCounts {
    pub fn record(&self, ok: bool, took: Duration) {
        let ns = nanos(took);
        let (n, sum) = if ok {
            (&self.ok, &self.ok_ns)
        } else {
            (&self.failed, &self.failed_ns)
        };
        n.fetch_add(1, Ordering::Relaxed);
        sum.fetch_add(ns, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }
}

impl VersionMetrics {
    /// A formed batch of `rows`, padded to `padded` rows.
    pub fn observe_batch(&self, rows: usize, padded: usize) {
        if let Some(h) = &self.batch_size {
            h.observe(rows as f64);
        }
        if let (Some(c), Some(pad)) = (&self.padding_rows, padded.checked_sub(rows)) {
            if pad > 0 {
                c.inc_by(pad as u64);
            }
        }
    }
    pub fn observe_queue(&self, waited: Duration) {
        self.counts.queued.fetch_add(1, Ordering::Relaxed);
        self.counts
            .queued_ns
            .fetch_add(nanos(waited), Ordering::Relaxed);
        if let Some(h) = &self.queue_time {
            h.observe(waited.as_secs_f64());
        }
    }
    pub fn observe_compute(&self, took: Duration) {
        self.counts.forwards.fetch_add(1, Ordering::Relaxed);
        self.counts
            .forwards_ns
            .fetch_add(nanos(took), Ordering::Relaxed);
        if let Some(h) = &self.compute_time {
            h.observe(took.as_secs_f64());
        }
    }
    /// Records a successful request; false when the handles are not set (a test's
    /// default metrics), so the caller records it the slow way.
    pub fn request_ok(&self, took: Duration) -> bool {
        match (&self.requests_ok, &self.latency) {
            (Some(c), Some(h)) => {
                c.inc();
                h.observe(took.as_secs_f64());
                true
            }
            _ => false,
        }
    }

    pub fn set_queue_depth(&self, depth: usize) {
        if let Some(g) = &self.queue_depth {
            g.set(depth as i64);
        }
    }
    /// One more (`true`) or one fewer request waiting (a version without batching).
    pub fn queue_step(&self, up: bool) {
        if let Some(g) = &self.queue_depth {
            if up {
                g.inc();
            } else {
                g.dec();
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("nnserve")),
            process: {
                let mut r = Registry::default();
                r.register_collector(Box::new(process::ProcessCollector));
                r
            },
            requests: Family::default(),
            latency: Family::new_with_constructor(seconds),
            queue_time: Family::new_with_constructor(seconds),
            compute_time: Family::new_with_constructor(seconds),
            batch_size: Family::new_with_constructor(batch_sizes),
            padding: Family::default(),
            queue_depth: Family::default(),
            versions: Family::default(),
            variant_requests: Family::default(),
            variant_latency: Family::new_with_constructor(seconds),
            shadow_requests: Family::default(),
            router_errors: Family::default(),
            router_time: Family::new_with_constructor(seconds),
            api_requests: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap();
            r.register(
                "requests",
                "Inference requests by outcome",
                m.requests.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Inference request latency, from routing to the answer",
                m.latency.clone(),
            );
            r.register(
                "queue_duration_seconds",
                "Time a request waited for its forward (its batch's, or a forward slot's)",
                m.queue_time.clone(),
            );
            r.register(
                "compute_duration_seconds",
                "Forward time per batch",
                m.compute_time.clone(),
            );
            r.register(
                "batch_size",
                "Rows per formed batch, before padding",
                m.batch_size.clone(),
            );
            r.register(
                "batch_padding_rows",
                "Zero rows added to batches to reach an allowed batch size (computed, then dropped)",
                m.padding.clone(),
            );
            r.register(
                "queue_depth",
                "Requests waiting for a version's forward",
                m.queue_depth.clone(),
            );
            r.register("versions", "Model versions by state", m.versions.clone());
            r.register(
                "endpoint_requests",
                "Requests an endpoint's router sent to each variant, by outcome",
                m.variant_requests.clone(),
            );
            r.register(
                "endpoint_request_duration_seconds",
                "Latency of requests through an endpoint, per variant",
                m.variant_latency.clone(),
            );
            r.register(
                "endpoint_shadow_requests",
                "Copies of requests sent to shadow variants, by outcome (answers not returned)",
                m.shadow_requests.clone(),
            );
            r.register(
                "router_errors",
                "Router failures per endpoint and plugin, by reason",
                m.router_errors.clone(),
            );
            r.register(
                "api_requests",
                "Requests on the API surface by protocol (http, grpc) and outcome",
                m.api_requests.clone(),
            );
            r.register(
                "router_duration_seconds",
                "Time of one router call (instantiate and route)",
                m.router_time.clone(),
            );
            r.register(
                "build",
                "The server's version and the model backends it was built with",
                prometheus_client::metrics::info::Info::new(vec![
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("backends", process::backends()),
                ]),
            );
        }
        m
    }

    /// Metrics read at each scrape from elsewhere (e.g. [`PluginPoolCollector`]), under
    /// the `nnserve_` prefix.
    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.lock().unwrap().register_collector(collector);
    }

    /// The object-store repository's health: `repository_sync_errors_total` (failed
    /// lists, reads and downloads) and `repository_last_sync_timestamp_seconds` (the last
    /// complete sync; 0 before the first).
    pub fn register_repository(&self, errors: Counter, last_sync: Gauge) {
        let mut r = self.registry.lock().unwrap();
        r.register(
            "repository_sync_errors",
            "Failed object-store requests of the repository sync (lists, reads, downloads)",
            errors,
        );
        r.register(
            "repository_last_sync_timestamp_seconds",
            "When the repository sync last completed without an error, seconds since the epoch",
            last_sync,
        );
    }

    /// Handles for one version's execution path.
    pub fn version(&self, model: &str, version: u64) -> VersionMetrics {
        let l = labels(model, version);
        VersionMetrics {
            batch_size: Some(self.batch_size.get_or_create(&l).clone()),
            padding_rows: Some(self.padding.get_or_create(&l).clone()),
            queue_time: Some(self.queue_time.get_or_create(&l).clone()),
            compute_time: Some(self.compute_time.get_or_create(&l).clone()),
            queue_depth: Some(self.queue_depth.get_or_create(&l).clone()),
            requests_ok: Some(
                self.requests
                    .get_or_create(&OutcomeLabels {
                        model: l.model.clone(),
                        version: l.version.clone(),
                        outcome: "ok".to_string(),
                    })
                    .clone(),
            ),
            latency: Some(self.latency.get_or_create(&l).clone()),
            counts: Default::default(),
        }
    }

    /// One request answered on the API surface: `protocol` `http` or `grpc`, `outcome`
    /// one of [`OUTCOMES`] (management and health calls included).
    pub fn api_request(&self, protocol: &'static str, outcome: &'static str) {
        self.api_requests
            .get_or_create(&ProtocolLabels { protocol, outcome })
            .inc();
    }

    /// Records one finished request.
    pub fn request(&self, model: &str, version: u64, outcome: &str, took: Duration) {
        let l = labels(model, version);
        self.requests
            .get_or_create(&OutcomeLabels {
                model: l.model.clone(),
                version: l.version.clone(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.latency.get_or_create(&l).observe(took.as_secs_f64());
    }

    /// Records one request an endpoint routed to `variant` (`shadow`: a copy).
    pub fn variant_request(
        &self,
        endpoint: &str,
        variant: &str,
        shadow: bool,
        outcome: &str,
        took: Duration,
    ) {
        let key = VariantOutcomeLabels {
            endpoint: endpoint.to_string(),
            variant: variant.to_string(),
            outcome: outcome.to_string(),
        };
        if shadow {
            self.shadow_requests.get_or_create(&key).inc();
            return;
        }
        self.variant_requests.get_or_create(&key).inc();
        self.variant_latency
            .get_or_create(&VariantLabels {
                endpoint: endpoint.to_string(),
                variant: variant.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a router failure.
    pub fn router_error(&self, endpoint: &str, plugin: &str, reason: &str) {
        self.router_errors
            .get_or_create(&RouterErrorLabels {
                endpoint: endpoint.to_string(),
                plugin: plugin.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records the time of one router call.
    pub fn router_call(&self, endpoint: &str, took: Duration) {
        self.router_time
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Moves a version from one state to another in the `versions` gauge. A version has
    /// one series there, for its current state: the old state's series is removed rather
    /// than left at 0, so uploads do not pile up zero series.
    pub fn version_state(&self, model: &str, version: u64, from: Option<&str>, to: &str) {
        let key = |state: &str| StateLabels {
            model: model.to_string(),
            version: version.to_string(),
            state: state.to_string(),
        };
        if let Some(from) = from {
            self.versions.remove(&key(from));
        }
        self.versions.get_or_create(&key(to)).set(1);
    }

    /// Removes a version's state series (a refused upload the registry no longer keeps).
    pub fn forget_state(&self, model: &str, version: u64, state: &str) {
        self.versions.remove(&StateLabels {
            model: model.to_string(),
            version: version.to_string(),
            state: state.to_string(),
        });
    }

    /// Removes the execution series of a version that has been retired (requests by
    /// outcome, latencies, batch sizes, queue depth): a server that takes many uploads
    /// would otherwise export every version it ever served. Its `nnserve_versions` series
    /// stays, at END.
    pub fn forget_version(&self, model: &str, version: u64) {
        let l = labels(model, version);
        for outcome in OUTCOMES {
            self.requests.remove(&OutcomeLabels {
                model: l.model.clone(),
                version: l.version.clone(),
                outcome: outcome.to_string(),
            });
        }
        self.latency.remove(&l);
        self.queue_time.remove(&l);
        self.compute_time.remove(&l);
        self.batch_size.remove(&l);
        self.padding.remove(&l);
        self.queue_depth.remove(&l);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        use prometheus_client::encoding::text;
        text::encode_registry(&mut out, &self.registry.lock().unwrap())
            .and_then(|()| text::encode_registry(&mut out, &self.process))
            .and_then(|()| text::encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }
}

fn labels(model: &str, version: u64) -> VersionLabels {
    VersionLabels {
        model: model.to_string(),
        version: version.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_their_labels() {
        let m = Metrics::new();
        let v = m.version("mlp", 1);
        v.observe_batch(3, 4);
        v.observe_batch(5, 5);
        m.request("mlp", 1, "ok", Duration::from_micros(50));
        m.version_state("mlp", 1, None, "AVAILABLE");
        let text = m.encode();
        assert!(
            text.contains("nnserve_batch_size_count{model=\"mlp\",version=\"1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("nnserve_batch_size_sum{model=\"mlp\",version=\"1\"} 8.0"),
            "{text}"
        );
        assert!(
            text.contains("nnserve_batch_padding_rows_total{model=\"mlp\",version=\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nnserve_requests_total{model=\"mlp\",version=\"1\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nnserve_versions{model=\"mlp\",version=\"1\",state=\"AVAILABLE\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1);
        assert!(
            text.contains(&format!(
                "nnserve_build_info{{version=\"{}\",backends=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION"),
                process::backends()
            )),
            "{text}"
        );
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_threads ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }

    #[test]
    fn a_retired_version_keeps_only_its_end_state_series() {
        let m = Metrics::new();
        let v = m.version("mlp", 1);
        v.observe_batch(2, 2);
        m.request("mlp", 1, "ok", Duration::from_micros(50));
        m.request("mlp", 1, "overload", Duration::from_micros(5));
        m.version_state("mlp", 1, None, "LOADING");
        m.version_state("mlp", 1, Some("LOADING"), "AVAILABLE");
        m.version("mlp", 2).observe_batch(1, 1);
        m.version_state("mlp", 1, Some("AVAILABLE"), "UNLOADING");
        m.version_state("mlp", 1, Some("UNLOADING"), "END");
        m.forget_version("mlp", 1);
        let text = m.encode();
        let v1: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("version=\"1\""))
            .collect();
        assert_eq!(
            v1,
            vec!["nnserve_versions{model=\"mlp\",version=\"1\",state=\"END\"} 1"],
            "{text}"
        );
        assert!(
            text.contains("nnserve_batch_size_count{model=\"mlp\",version=\"2\"} 1"),
            "the other version's series stay: {text}"
        );
    }
}
