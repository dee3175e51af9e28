//! Start-up: thread pools, the plugin runtime, the repository load, then the listener.

use crate::api::{self, AppState};
use crate::config::ServerConfig;
use crate::lifecycle::source::LocalSource;
use crate::lifecycle::{self, Registry};
use crate::plugin::{PluginRuntime, RuntimeConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The object-store repository of `url` and this replica's locked cache of it.
fn open_objects(
    config: &ServerConfig,
    url: &str,
    limits: &crate::archive::Limits,
) -> anyhow::Result<lifecycle::objects::ObjectRepo> {
    use lifecycle::objects;
    let (store, prefix) = objects::open_store(url)?;
    let (cache, lock) = match &config.cache_dir {
        Some(dir) => match objects::lock_cache(dir)? {
            Some(lock) => (dir.clone(), lock),
            None => anyhow::bail!(
                "another nnserve uses the cache {} (give each replica its own --cache-dir, or leave it out for a free one)",
                dir.display()
            ),
        },
        None => objects::default_cache_dir(url)?,
    };
    tracing::info!(repository = url, cache = %cache.display(), "object-store repository");
    Ok(objects::ObjectRepo::new(
        store,
        prefix,
        url.to_string(),
        cache,
        Some(lock),
        limits.clone(),
    ))
}

/// Start-up with an object store: the cache is checked (a restart reuses what is
/// valid), the store's conditional writes are checked, and the bucket is synced. A
/// bucket that cannot be reached is not fatal: the replica serves its cache and the
/// poller keeps trying.
async fn first_sync(
    o: &lifecycle::objects::ObjectRepo,
    poll_ms: u64,
    wanted: &(dyn Fn(
        &str,
        &std::collections::BTreeSet<u64>,
        &std::collections::BTreeMap<String, u64>,
    ) -> std::collections::BTreeSet<u64>
          + Sync),
) -> anyhow::Result<()> {
    let cache = o.cache.root.display().to_string();
    // Digests of every cached version: seconds for large models (nothing serves yet).
    let kept = tokio::task::block_in_place(|| o.check_cache());
    let reachable = o.check_conditional_writes().await?;
    let synced = if reachable {
        o.sync_all(true, wanted).await
    } else {
        Err("unreachable".into())
    };
    match synced {
        Ok(news) => {
            let fetched: usize = news.values().map(|n| n.installed.len()).sum();
            tracing::info!(repository = %o.url, cache, cached = kept, downloaded = fetched, "synced the object store into the cache");
        }
        Err(e) => tracing::warn!(
            repository = %o.url, cache,
            "the object store cannot be reached ({e}): serving the {kept} versions the cache holds; \
             the poller retries {}",
            if poll_ms > 0 { "with backoff" } else { "never (poll_interval_ms is 0)" }
        ),
    }
    if poll_ms == 0 {
        tracing::warn!("poll_interval_ms is 0: this replica never sees the other replicas' uploads, deletes and label changes");
    }
    Ok(())
}

/// What serving needs besides its listeners: the plugin runtime, the registry, the
/// manager over the repository (or the object store's cache, or a one-model view) and
/// the request path's state, with warm-ups wired to it. Nothing is loaded yet.
pub struct Assembled {
    pub state: AppState,
    pub manager: Arc<lifecycle::Manager>,
    pub objects: Option<Arc<lifecycle::objects::ObjectRepo>>,
    /// The view of `single_model`, removed when dropped.
    pub view: Option<tempfile::TempDir>,
}

pub fn assemble(
    config: &ServerConfig,
    token: Option<&str>,
    management: crate::config::Management,
) -> anyhow::Result<Assembled> {
    crate::backend::init_threads(config.intra_op_threads(), config.torch_inter_op_threads);
    let runtime = Arc::new(PluginRuntime::new(RuntimeConfig {
        instance_slots: config.plugin_instance_slots,
        warm_slots: config.plugin_warm_slots,
        max_memory_mib: config.plugin_max_memory_mib,
        max_cpu_ms: config.plugin_max_cpu_ms,
        total_memory_bytes: config.plugin_memory_total_bytes(),
    })?);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    if let Some(pool) = runtime.pool_metrics() {
        metrics.register_collector(Box::new(crate::metrics::PluginPoolCollector(pool)));
    }
    let budget = lifecycle::DeviceBudget::new(&config.device_memory_mib);
    let registry = Arc::new(Registry::new(metrics.clone(), budget));
    // Handlers find the models they declare as dependencies here; weak, since the
    // registry holds the handlers.
    let lookup: std::sync::Weak<dyn crate::nn::ModelLookup> = Arc::downgrade(&registry) as _;
    runtime.set_lookup(lookup);
    let loader = Arc::new(lifecycle::Loader {
        runtime: runtime.clone(),
        metrics: metrics.clone(),
        budget: registry.budget.clone(),
        warmup: Default::default(),
    });
    let limits_archive = crate::archive::Limits {
        max_archive_bytes: config.max_upload_bytes,
        ..Default::default()
    };
    let objects = match config.repository_url() {
        Some(url) => Some(Arc::new(open_objects(config, url, &limits_archive)?)),
        None => None,
    };
    // A directory holding one model (KServe's /mnt/models) is served through a view.
    let (root, _view) = match &objects {
        Some(o) => {
            anyhow::ensure!(
                config.model_name.is_none(),
                "--model-name applies to a directory holding one model, not to an object store"
            );
            (o.cache.root.clone(), None)
        }
        None => crate::single_model::prepare(config)?,
    };
    let mut manager = lifecycle::Manager::new(
        LocalSource::new(root),
        registry.clone(),
        loader.clone(),
        config.policies(),
        limits_archive,
        lifecycle::Uploads::new(config.max_concurrent_uploads),
    );
    if let Some(o) = &objects {
        metrics.register_repository(o.health.errors.clone(), o.health.last_sync.clone());
        manager = manager.with_objects(o.clone());
    }
    let manager = Arc::new(manager);
    let state = AppState {
        metrics,
        registry: registry.clone(),
        manager: manager.clone(),
        admin_token: token.map(api::TokenDigest::of),
        management,
        max_request_bytes: config.max_request_bytes,
        max_response_bytes: config.max_response_bytes,
        max_upload_bytes: config.max_upload_bytes,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        routing_stats: Default::default(),
        json_gate: Arc::new(api::JsonGate::new(config.max_request_bytes)),
        probe: Arc::new(api::Probe::new(config.readiness)),
    };
    // Warm-up requests go through the real request path, which needs the state.
    let hook = api::warmup_hook(state.clone());
    let _ = loader.warmup.set(hook);

    Ok(Assembled {
        state,
        manager,
        objects,
        view: _view,
    })
}

/// Loads the repository and serves until ctrl-c or SIGTERM.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    config.check()?; // also for a config built in code, not read from a file
                     // Refusals that need no model come first: a misconfigured server stops at once.
    let token = config.admin_token()?;
    let management = config.management(token.is_some())?;
    if management == crate::config::Management::Open && !config.loopback_only() {
        tracing::warn!(
            listen = %config.listen,
            grpc_listen = ?config.grpc_listen,
            "the management API (uploads, deletes, labels) is open to the network without a token (--management open)"
        );
    }
    let (tls, grpc_tls) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => (
            Some(crate::connections::tls_acceptor(cert, key, b"http/1.1")?),
            Some(crate::connections::tls_acceptor(cert, key, b"h2")?),
        ),
        _ => (None, None),
    };
    let limits = config.connection_limits();
    // From here on SIGTERM and ctrl-c stop the server cleanly (exit 0), also while the
    // repository loads.
    let signals = install_signals()?;
    let started = Instant::now();
    let Assembled {
        state,
        manager,
        objects,
        view: _view,
    } = assemble(&config, token.as_deref(), management)?;
    let registry = state.registry.clone();

    // The listeners open before the repository loads: liveness answers from the first
    // second, readiness once the start-up versions have loaded (`api::probe`).
    let listener = listen(config.listen).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e} (pick another with --listen)",
            config.listen
        )
    })?;
    let addr = listener.local_addr()?;
    let grpc_listener = match config.grpc_listen {
        Some(at) => Some(listen(at).map_err(|e| {
            anyhow::anyhow!("cannot listen on {at}: {e} (pick another with --grpc-listen)")
        })?),
        None => None,
    };
    let probe = state.probe.clone();
    let stages = shutdown_stages(
        signals.clone(),
        Duration::from_secs(config.drain_seconds),
        probe.clone(),
        registry.clone(),
    );
    let grpc_routes = crate::grpc::routes(state.clone());
    let grpc_bound = crate::grpc::bound(&state, &limits);
    let app = api::router(state, config.max_request_bytes);
    let scheme = if tls.is_some() { "https" } else { "http" };
    crate::logging::announce(&format!("nnserve live on {scheme}://{addr}"));
    let grpc = match grpc_listener {
        Some(l) => {
            let at = l.local_addr()?;
            let scheme = if grpc_tls.is_some() { "grpcs" } else { "grpc" };
            crate::logging::announce(&format!("nnserve gRPC live on {scheme}://{at}"));
            let task = tokio::spawn(crate::grpc::serve(
                l,
                grpc_routes,
                grpc_bound,
                limits.clone(),
                grpc_tls,
                stage(stages.clone(), 1),
                stage(stages.clone(), 2),
            ));
            Some((task, format!("{scheme}://{at}")))
        }
        None => None,
    };
    let grace = limits.grace;
    let http = tokio::spawn(crate::connections::serve(
        listener,
        app,
        limits.clone(),
        tls,
        stage(stages.clone(), 1),
        stage(stages.clone(), 2),
    ));

    tracing::info!(repository = %config.repository.display(), "loading the repository");
    manager.source.clear_scratch();
    let loading = async {
        if let Some(o) = &objects {
            let wanted =
                |model: &str,
                 complete: &std::collections::BTreeSet<u64>,
                 labels: &std::collections::BTreeMap<String, u64>| {
                    manager.wanted(model, complete, labels, &Default::default())
                };
            first_sync(o, config.poll_interval_ms, &wanted).await?;
        }
        manager.load_repository().await
    };
    let report = tokio::select! {
        report = loading => report?,
        _ = nth_signal(signals.clone(), 1) => {
            tracing::info!("stopped while loading the repository");
            return Ok(());
        }
    };
    tracing::info!(
        loaded = report.loaded.len(),
        failed = report.failed.len(),
        "repository loaded: {}",
        report.loaded.join(", ")
    );
    probe.loaded(report.failed_models.clone(), &registry);
    if !probe.is_ready(&registry) && !probe.draining() {
        tracing::warn!(
            readiness = ?config.readiness,
            "not ready: the versions of {} failed to load; /v2/health/ready answers 503 until \
             each has a version available (--readiness any serves what loaded)",
            report.failed_models.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if config.poll_interval_ms > 0 {
        let interval = Duration::from_millis(config.poll_interval_ms);
        tokio::spawn(manager.clone().poll(interval));
    }
    tracing::info!(
        took = ?started.elapsed(),
        management = management.as_str(),
        max_connections = limits.max_connections,
        ready = probe.is_ready(&registry),
        "serving"
    );
    // Tests and scripts wait for these lines on stdout (the start-up load has finished);
    // keep their shape. The gRPC one follows the HTTP one.
    crate::logging::announce(&format!("nnserve listening on {scheme}://{addr}"));
    if let Some((_, at)) = &grpc {
        crate::logging::announce(&format!("nnserve gRPC listening on {at}"));
    }
    http.await??;
    if let Some((grpc, _)) = grpc {
        grpc.await??;
    }
    // An upload past its body runs to its end (its store is not cut half-way): give the
    // ones still storing the same grace, unless a second signal asked to stop now.
    if *signals.borrow() < 2 && !manager.uploads.settle(grace).await {
        tracing::warn!(
            "uploads still storing after the grace period are cut; their versions are not stored"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// The shutdown's stages, driven by the signals: 1 when the drain is over (the first
/// signal, then `drain`; readiness is false from the signal on), 2 on a second signal
/// (cut what is in service and exit). A second signal during the drain goes to 2 at once.
fn shutdown_stages(
    mut signals: tokio::sync::watch::Receiver<u32>,
    drain: Duration,
    probe: Arc<api::Probe>,
    registry: Arc<Registry>,
) -> tokio::sync::watch::Receiver<u8> {
    let (tx, rx) = tokio::sync::watch::channel(0u8);
    tokio::spawn(async move {
        if signals.wait_for(|&n| n >= 1).await.is_err() {
            return;
        }
        probe.drain(&registry);
        if !drain.is_zero() {
            tracing::info!(
                drain = ?drain,
                "draining: /v2/health/ready answers 503 while requests are still served; \
                 a second signal exits at once"
            );
            let second = signals.clone();
            tokio::select! {
                _ = tokio::time::sleep(drain) => {},
                _ = nth_signal(second, 2) => {},
            }
        }
        tracing::info!(
            "shutting down: no new connections (a second signal cuts requests in service)"
        );
        tx.send_replace(1);
        if signals.wait_for(|&n| n >= 2).await.is_ok() {
            tx.send_replace(2);
        }
    });
    rx
}

/// Resolves once the shutdown has reached `n`.
async fn stage(mut stages: tokio::sync::watch::Receiver<u8>, n: u8) {
    if stages.wait_for(|&s| s >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// SIGTERM and ctrl-c, handled from the moment this is called: the count so far.
fn install_signals() -> anyhow::Result<tokio::sync::watch::Receiver<u32>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(rx)
}

/// Resolves once `n` signals have arrived.
async fn nth_signal(mut signals: tokio::sync::watch::Receiver<u32>, n: u32) {
    if signals.wait_for(|&count| count >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Binds the listener with a deep accept queue: a burst of connections (2,000 at once in
/// the slowloris test) overflowed the default 1,024, and a dropped SYN costs its client a
/// one-second retransmission. The kernel caps it at `net.core.somaxconn`.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}
