//! Start-up: thread pools, the plugin runtime, the repository load, then the listener.

use crate::api::{self, AppState};
use crate::config::ServerConfig;
use crate::lifecycle::{self, Registry};
use crate::plugin::{PluginRuntime, RuntimeConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Loads the repository and serves until ctrl-c or SIGTERM.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    config.check()?; // also for a config built in code, not read from a file
    let started = Instant::now();
    crate::backend::init_threads(config.intra_op_threads(), config.torch_inter_op_threads);
    let runtime = Arc::new(PluginRuntime::new(RuntimeConfig {
        instance_slots: config.plugin_instance_slots,
        max_memory_mib: config.plugin_max_memory_mib,
        max_cpu_ms: config.plugin_max_cpu_ms,
        total_memory_bytes: config.plugin_memory_total_bytes(),
    })?);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let budget = lifecycle::DeviceBudget::new(&config.device_memory_mib);
    let registry = Arc::new(Registry::new(metrics.clone(), budget));
    let policies = config.policies()?;
    let manager = Arc::new(crate::manage::Manager {
        root: config.repository.clone(),
        runtime: runtime.clone(),
        registry: registry.clone(),
        limits: crate::archive::Limits {
            max_archive_bytes: config.max_upload_bytes,
            ..Default::default()
        },
        policies: policies.clone(),
        warmup: Default::default(),
        unloaded: Default::default(),
        uploads: crate::manage::Uploads::new(config.max_concurrent_uploads),
    });
    let state = AppState {
        metrics,
        registry: registry.clone(),
        manager: manager.clone(),
        admin_token: config.admin_token.as_deref().map(Arc::from),
        max_request_bytes: config.max_request_bytes,
        max_response_bytes: config.max_response_bytes,
        max_upload_bytes: config.max_upload_bytes,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        routing_stats: Default::default(),
        json_gate: Arc::new(api::JsonGate::new(config.max_request_bytes)),
    };
    // Warm-up requests go through the real request path, which needs the state.
    let hook = api::warmup_hook(state.clone());
    let _ = manager.warmup.set(hook.clone());

    tracing::info!(repository = %config.repository.display(), "loading the repository");
    crate::repository::clear_scratch(&config.repository);
    let report = lifecycle::load_repository(
        &config.repository,
        runtime,
        &registry,
        &policies,
        Some(&hook),
    )
    .await?;
    tracing::info!(
        loaded = report.loaded.len(),
        failed = report.failed.len(),
        "repository loaded: {}",
        report.loaded.join(", ")
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (pick another with --listen)",
                config.listen
            )
        })?;
    let addr = listener.local_addr()?;
    if config.poll_interval_ms > 0 {
        let interval = Duration::from_millis(config.poll_interval_ms);
        tokio::spawn(manager.clone().poll(interval));
    }
    let app = api::router(state, config.max_request_bytes);
    tracing::info!(took = ?started.elapsed(), "ready");
    // Tests and scripts wait for this line on stdout; keep its shape.
    println!("nnserve listening on http://{addr}");
    api::serve(listener, app).await
}
