//! Model execution backends: load one model version on its device and run forwards.
//!
//! A backend knows tensors, files and devices; it knows nothing of HTTP, Wasm, names
//! of models or batching. `nn` drives it.

pub mod torch;

use crate::bundle::{BackendKind, Bundle, DeviceSpec};
use crate::tensor::Tensor;
use std::sync::Arc;

/// A loaded model version, ready for forwards from any thread.
pub trait Model: Send + Sync {
    /// Runs one forward. `inputs` are positional, in the order of the manifest's
    /// `inputs`; the result is every output with its name.
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String>;

    /// The device it runs on, for status and logs (`cpu`, `cuda:0`).
    fn device(&self) -> String;

    /// Intra-op threads for this model's forwards from now on (0: the process default).
    fn set_threads(&self, _threads: usize) {}
}

/// Intra-op threads for a version: the server's fixed choice, or by its warm-up forward
/// time: 1 for a forward under [`PARALLEL_FROM`] (threads cost more than they give, and
/// HTTP and plugins need the cores), else the cores shared among its batch threads.
pub fn threads_for(
    fixed: Option<usize>,
    forward: Option<std::time::Duration>,
    batch_threads: usize,
) -> usize {
    if let Some(n) = fixed {
        return n.max(1);
    }
    match forward {
        Some(t) if t >= PARALLEL_FROM => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / batch_threads.max(1)).max(1)
        }
        _ => 1,
    }
}

/// The batch-1 forward time from which a version gets more than one intra-op thread.
pub const PARALLEL_FROM: std::time::Duration = std::time::Duration::from_millis(1);

/// Loads the model of a bundle. Blocking: call it off the async runtime.
pub fn load(bundle: &Bundle) -> anyhow::Result<Arc<dyn Model>> {
    let spec = bundle
        .manifest
        .model
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the bundle has no [model] section"))?;
    let device = DeviceSpec::parse(&spec.device).map_err(anyhow::Error::msg)?;
    let output_names = spec.outputs.iter().map(|o| o.name.clone()).collect();
    match spec.backend {
        BackendKind::Torchscript => Ok(Arc::new(torch::TorchModel::load(
            &bundle.file(&spec.path),
            device,
            output_names,
        )?)),
        BackendKind::Tensorflow => {
            anyhow::bail!("the tensorflow backend is not part of this build yet")
        }
    }
}

/// Process-wide threading for the backends, set once at start-up before any model
/// loads (libtorch allows setting inter-op threads only once per process). `intra_op`:
/// the server's fixed choice, or `None` to choose per version ([`threads_for`]).
pub fn init_threads(intra_op: Option<usize>, inter_op: usize) {
    let _ = FIXED_THREADS.set(intra_op);
    torch::init_threads(intra_op.unwrap_or(1), inter_op);
}

static FIXED_THREADS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// The server's fixed intra-op threads, if it set them (`None` before start-up too).
pub fn fixed_threads() -> Option<usize> {
    FIXED_THREADS.get().copied().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn threads_follow_the_forward_time_unless_fixed() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let quick = Some(Duration::from_micros(50));
        let slow = Some(Duration::from_millis(40));
        assert_eq!(threads_for(None, quick, 1), 1);
        assert_eq!(threads_for(None, None, 1), 1);
        assert_eq!(threads_for(None, slow, 1), cores);
        assert_eq!(threads_for(None, slow, 2), (cores / 2).max(1));
        assert_eq!(threads_for(None, slow, 64), 1);
        assert_eq!(threads_for(Some(3), quick, 1), 3);
        assert_eq!(threads_for(Some(0), slow, 1), 1);
    }
}
