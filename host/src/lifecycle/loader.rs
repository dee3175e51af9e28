//! Loading one version: open and check its bundle, reserve its device memory, load the
//! model, warm it up, compile its plugins, and replay its warm-up requests. The result
//! is a [`Servable`] that nothing serves yet; [`super::manager`] decides whether it
//! does.
//!
//! Loads run on a thread of their own at a lower CPU priority ([`in_background`]), so
//! serving keeps the cores it needs.

use super::registry::{EndpointVersion, ModelVersion, Servable};
use crate::bundle::Bundle;
use crate::metrics::{Metrics, VersionMetrics};
use crate::nn::Runner;
use crate::plugin::PluginRuntime;
use crate::repository::Entry;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Memory budgets per device (`cpu`, `cuda:0`, ...), from the config. A version reserves
/// its model's size (the model file's bytes: the weights) before it loads; the
/// reservation is released when the version's last handle is dropped.
#[derive(Debug, Default)]
pub struct DeviceBudget {
    limits: BTreeMap<String, u64>,
    used: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// A version's share of a device budget; released on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<DeviceBudget>,
    device: String,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap();
        if let Some(u) = used.get_mut(&self.device) {
            *u = u.saturating_sub(self.bytes);
        }
    }
}

/// A load refused by a device's memory budget: the bundle is fine, the server has no
/// room for it now (an upload answers 409 with this, not 400).
#[derive(Debug)]
pub struct BudgetExceeded(pub String);

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BudgetExceeded {}

impl DeviceBudget {
    /// Budgets in MiB per device name.
    pub fn new(limits_mib: &BTreeMap<String, u64>) -> DeviceBudget {
        DeviceBudget {
            limits: limits_mib
                .iter()
                .map(|(d, m)| (d.clone(), m.saturating_mul(1 << 20)))
                .collect(),
            used: Default::default(),
        }
    }

    /// Reserves `bytes` on `device`, or says why not and what to do.
    pub fn reserve(
        self: &Arc<Self>,
        what: &str,
        device: &str,
        bytes: u64,
    ) -> anyhow::Result<Reservation> {
        let mut used = self.used.lock().unwrap();
        let now = used.get(device).copied().unwrap_or(0);
        if let Some(&limit) = self.limits.get(device) {
            let mib = |b: u64| b.div_ceil(1 << 20);
            if bytes > limit {
                return Err(BudgetExceeded(format!(
                    "{what} needs about {} MiB on {device}, more than its whole budget of {} MiB \
                     (device_memory_mib in the server config): raise that budget to at least {} MiB",
                    mib(bytes),
                    limit >> 20,
                    mib(bytes)
                ))
                .into());
            }
            if now + bytes > limit {
                return Err(BudgetExceeded(format!(
                    "{what} needs about {} MiB on {device}, but {} of its {} MiB budget are in use \
                     (device_memory_mib in the server config): unload a version or raise the budget \
                     (replacing a version needs room for both while requests move over)",
                    mib(bytes),
                    mib(now),
                    limit >> 20
                ))
                .into());
            }
        }
        used.insert(device.to_string(), now + bytes);
        Ok(Reservation {
            budget: self.clone(),
            device: device.to_string(),
            bytes,
        })
    }

    /// Bytes reserved per device now.
    pub fn used(&self) -> BTreeMap<String, u64> {
        self.used.lock().unwrap().clone()
    }
}

/// Runs background work (loading a model, checking an upload) on a thread of its own
/// at a lower CPU priority (nice 10), so that serving the loaded models keeps the cores
/// it needs; awaits its result without blocking the runtime. Not the blocking pool: its
/// threads can become runtime workers (`block_in_place`), which must not be niced.
pub async fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nnserve-loader".into())
        .spawn(move || {
            // SAFETY: setpriority on this thread's own id has no memory effects.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
            }
            let _ = tx.send(f());
            crate::alloc::release_thread_memory();
        })?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the loader thread panicked"))
}

/// Replays a version's warm-up requests (`warmup/*.json`) through the real request
/// path before it is published. Set by the server, which owns the request path.
pub type WarmupHook = Arc<
    dyn Fn(Arc<ModelVersion>) -> futures::future::BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

/// Why a load failed.
#[derive(Debug)]
pub enum LoadError {
    /// A device budget has no room now: not the bundle's fault.
    NoRoom(String),
    /// The bundle does not load: the full error (for the log and the admin).
    Failed(String),
    /// A warm-up request did not succeed.
    WarmUp(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::NoRoom(m) | LoadError::Failed(m) | LoadError::WarmUp(m) => f.write_str(m),
        }
    }
}

/// Loads one version, ready to publish. The manager calls it through this trait so
/// that its unit tests can count, fail and hold loads.
pub trait Load: Send + Sync {
    fn load(&self, entry: Entry) -> futures::future::BoxFuture<'_, Result<Servable, LoadError>>;
}

/// The real loader: libtorch, wasmtime, the device budgets and the warm-up requests.
pub struct Loader {
    pub runtime: Arc<PluginRuntime>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<DeviceBudget>,
    /// Replays warm-up requests; set once the request path exists.
    pub warmup: OnceLock<WarmupHook>,
}

impl Load for Loader {
    fn load(&self, entry: Entry) -> futures::future::BoxFuture<'_, Result<Servable, LoadError>> {
        Box::pin(async move {
            let (rt, all_metrics, budget) = (
                self.runtime.clone(),
                self.metrics.clone(),
                self.budget.clone(),
            );
            let loaded = in_background(move || {
                let metrics = || all_metrics.version(&entry.model, entry.version);
                load_version(&entry, &rt, metrics, Some(&budget))
            })
            .await
            .and_then(|r| r)
            .map_err(|e| match e.downcast_ref::<BudgetExceeded>() {
                Some(full) => LoadError::NoRoom(full.to_string()),
                None => LoadError::Failed(format!("{e:#}")),
            })?;
            if let (Servable::Model(m), Some(hook)) = (&loaded, self.warmup.get()) {
                hook(m.clone()).await.map_err(LoadError::WarmUp)?;
            }
            Ok(loaded)
        })
    }
}

static SERVED_AS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The model whose bundle is served under this name, whatever its `bundle.toml` says:
/// the one bundle of a directory given `--model-name` (`single_model`, KServe's
/// `/mnt/models`). Its plugin reaches the model as `default` (the SDK's `Model::load`)
/// and by this name. Set once per process.
pub fn serve_as(model: &str) {
    let _ = SERVED_AS.set(model.to_string());
}

/// Opens, checks, loads and warms up one version. Blocking.
pub fn load_version(
    entry: &Entry,
    runtime: &PluginRuntime,
    metrics: impl FnOnce() -> VersionMetrics,
    budget: Option<&Arc<DeviceBudget>>,
) -> anyhow::Result<Servable> {
    let mut bundle = Bundle::open(&entry.dir)?;
    if SERVED_AS.get() == Some(&entry.model) {
        // One bundle served under the name it is given (`single_model`).
        bundle.manifest.bundle.name = entry.model.clone();
    }
    if bundle.name() != entry.model || bundle.version() != entry.version {
        anyhow::bail!(
            "bundle.toml says {}@{} but the directory is {}/{}: the directory must be <name>/<version>",
            bundle.name(),
            bundle.version(),
            entry.model,
            entry.version
        );
    }
    if bundle.manifest.is_endpoint() {
        let endpoint = crate::routing::Endpoint::load(&bundle, runtime)?;
        return Ok(Servable::Endpoint(Arc::new(EndpointVersion::new(
            bundle, endpoint,
        ))));
    }
    let mut spec = match (&bundle.manifest.model, &bundle.manifest.handler) {
        (Some(m), _) => m.clone(),
        // A model-less handler: the plugin alone serves (`backend::NoModel`).
        (None, Some(_)) => crate::bundle::ModelSpec::none(),
        (None, None) => anyhow::bail!("bundle.toml has neither [model], [handler] nor [endpoint]"),
    };
    let device = match spec.backend {
        // TensorFlow runs on the CPU in this build (backend::load refuses a GPU device).
        crate::bundle::BackendKind::Tensorflow | crate::bundle::BackendKind::None => {
            "cpu".to_string()
        }
        crate::bundle::BackendKind::Torchscript => {
            match crate::backend::torch::select_device(
                crate::bundle::DeviceSpec::parse(&spec.device).map_err(anyhow::Error::msg)?,
            )? {
                tch::Device::Cuda(n) => format!("cuda:{n}"),
                _ => "cpu".to_string(),
            }
        }
    };
    let model_bytes = crate::archive::list_files(&bundle.file(&spec.path))
        .map(|files| files.iter().map(|(_, m)| m.len()).sum())
        .ok()
        .filter(|&n: &u64| n > 0)
        .unwrap_or_else(|| {
            std::fs::metadata(bundle.file(&spec.path))
                .map(|m| m.len())
                .unwrap_or(0)
        });
    let reservation = match budget {
        Some(_) if spec.backend == crate::bundle::BackendKind::None => None,
        Some(b) => Some(b.reserve(
            &format!("{}@{}", entry.model, entry.version),
            &device,
            model_bytes,
        )?),
        None => None,
    };
    let loaded = crate::backend::load(&bundle)?;
    if let Some((inputs, outputs)) = loaded.signature {
        // The signature's own names, dtypes and shapes (checked against the manifest's).
        spec.inputs = inputs;
        spec.outputs = outputs;
    }
    let model = loaded.model;
    let forward_time = warm_up(model.as_ref(), &spec, bundle.manifest.batching.as_ref())?;
    let batching = bundle.manifest.batching.as_ref();
    let mut threading = crate::backend::threading(
        crate::backend::fixed_threads(),
        forward_time,
        batching.and_then(|b| b.num_batch_threads.map(|n| n as usize)),
        device == "cpu",
    );
    if let Some(fixed) = model.fixed_intra_op() {
        threading.intra_op = fixed;
    }
    tracing::debug!(model = %entry.model, version = entry.version, ?forward_time, ?threading, "forwards at once and intra-op threads");
    let runner = Arc::new(Runner::new(
        model,
        spec.inputs.clone(),
        &spec.outputs,
        batching,
        metrics(),
        threading,
    ));
    if let Some(t) = forward_time {
        // The first requests already know whether to run inline or in block_in_place.
        runner.seed_forward_time(t);
    }
    let handler = match &bundle.manifest.handler {
        Some(_) => Some(runtime.load_handler(
            &bundle,
            (spec.backend != crate::bundle::BackendKind::None).then(|| runner.clone()),
        )?),
        None => None,
    };
    Ok(Servable::Model(Arc::new(ModelVersion::new(
        bundle,
        spec,
        runner,
        handler,
        reservation,
    ))))
}

/// Runs the model on zeros of its declared input shapes: twice with batch 1, then once
/// per allowed batch size, so that a model that cannot run fails here and TorchScript's
/// profiling executor has optimised for every batch shape before the first request.
/// Skipped when the inputs are not declared.
fn warm_up(
    model: &dyn crate::backend::Model,
    spec: &crate::bundle::ModelSpec,
    batching: Option<&crate::bundle::BatchingSpec>,
) -> anyhow::Result<Option<std::time::Duration>> {
    let declared = |i: &crate::bundle::TensorSpec| i.shape.iter().skip(1).all(|&d| d > 0);
    if spec.inputs.is_empty() || !spec.inputs.iter().all(declared) {
        return Ok(None);
    }
    let mut batch_one = None;
    let mut sizes = vec![1, 1];
    if let Some(b) = batching {
        sizes.extend(b.allowed_batch_sizes.iter().map(|&s| s as i64));
    }
    for batch in sizes {
        let inputs = spec
            .inputs
            .iter()
            .map(|i| {
                let mut shape: Vec<i64> = i.shape.iter().map(|&d| d.max(1)).collect();
                if let Some(first) = shape.first_mut() {
                    *first = batch;
                }
                // The manifest's shapes are the bundle author's: checked, and allocated
                // with try_reserve so that an absurd one fails the load, not the process.
                let bytes = crate::tensor::checked_bytes(&shape, i.dtype).ok_or_else(|| {
                    anyhow::anyhow!("input '{}': the declared shape {:?} is too large", i.name, i.shape)
                })?;
                let mut zeros = Vec::new();
                zeros.try_reserve_exact(bytes).map_err(|_| {
                    anyhow::anyhow!(
                        "input '{}': a warm-up batch of shape {shape:?} needs {bytes} bytes, which cannot be allocated; check the declared shape",
                        i.name
                    )
                })?;
                zeros.resize(bytes, 0);
                Tensor::new(i.dtype, shape, zeros).map_err(anyhow::Error::msg)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let started = Instant::now();
        model.forward(inputs).map_err(|e| {
            anyhow::anyhow!(
                "warm-up forward on zeros of the declared input shapes (batch {batch}) failed: {e}"
            )
        })?;
        if batch == 1 {
            batch_one = Some(started.elapsed());
        }
    }
    Ok(batch_one)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_budgets_refuse_past_the_limit_and_release_on_drop() {
        let budget = Arc::new(DeviceBudget::new(&BTreeMap::from([(
            "cpu".to_string(),
            10,
        )])));
        let a = budget.reserve("a@1", "cpu", 6 << 20).unwrap();
        let err = budget
            .reserve("b@1", "cpu", 6 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b@1 needs about 6 MiB on cpu, but 6 of its 10 MiB budget are in use"),
            "{err}"
        );
        assert!(
            budget.reserve("c@1", "cuda:0", 1 << 40).is_ok(),
            "no budget set for cuda:0"
        );
        drop(a);
        assert!(budget.reserve("b@1", "cpu", 6 << 20).is_ok());
    }
}
