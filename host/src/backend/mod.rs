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
}

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
/// loads (libtorch allows setting inter-op threads only once per process).
pub fn init_threads(intra_op: usize, inter_op: usize) {
    torch::init_threads(intra_op, inter_op);
}
