//! Model execution backends: load one model version on its device and run forwards.
//!
//! A backend knows tensors, files and devices; it knows nothing of HTTP, Wasm, names
//! of models or batching. `nn` drives it.

#[cfg(feature = "tensorflow")]
pub mod tensorflow;
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

    /// Intra-op threads for this model's forwards from now on.
    fn set_threads(&self, _threads: IntraOp) {}

    /// The intra-op threads it uses whatever it is told, when they are fixed at load
    /// (TensorFlow sizes its pools per session): what the status then reports.
    fn fixed_intra_op(&self) -> Option<IntraOp> {
        None
    }

    /// Whether this is [`NoModel`]: a model-less handler bundle's.
    fn is_none(&self) -> bool {
        false
    }
}

/// libtorch intra-op threads per forward of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntraOp {
    /// Always this many (`--torch-threads`, or 1 for a quick model).
    Fixed(usize),
    /// The cores shared among the forwards running at that moment on the forward threads
    /// (this one included): a lone forward gets every core, and with others running the
    /// first forward thread takes the cores they leave. See [`shared_threads`].
    Shared,
}

impl IntraOp {
    /// As `GET /v1/models` shows it: a count, or `"shared"`.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            IntraOp::Fixed(n) => n.into(),
            IntraOp::Shared => "shared".into(),
        }
    }
}

/// How a version uses the CPU: how many forwards may run at once (`num_batch_threads`
/// with batching, the gate's permits without) and the intra-op threads of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threading {
    pub concurrency: usize,
    pub intra_op: IntraOp,
}

/// The threading of a version, from the server's fixed intra-op threads (if set), the
/// warm-up's batch-1 forward time, the bundle's `num_batch_threads` (if set) and whether
/// the model runs on the CPU.
///
/// A quick model (forward under [`PARALLEL_FROM`], or not measured) runs one forward at
/// a time on 1 thread: threads and concurrent forwards cost more than they give, and HTTP
/// and plugins need the cores. A compute-bound model on the CPU may run one forward per
/// core at once, each with [`IntraOp::Shared`] threads. On 2 cores, ResNet-18 behind its
/// plugin at c=16 served 1.5-22 % more this way than with one forward of 2 threads at a
/// time, in each of nine alternating rounds (bench/README.md): one forward's threads wait for each
/// other at every layer, so any other work on a core (decoding the next requests) stalls
/// both, while single-threaded forwards side by side lose only the time taken. A lone
/// request still gets every core. On a GPU one forward runs at a time (one stream), on
/// one CPU thread.
pub fn threading(
    fixed: Option<usize>,
    forward: Option<std::time::Duration>,
    batch_threads: Option<usize>,
    on_cpu: bool,
) -> Threading {
    let cores = cores();
    let compute_bound = matches!(forward, Some(t) if t >= PARALLEL_FROM);
    let intra_op = match fixed {
        // What the forward really uses: on a GPU one CPU thread, whatever was configured
        // (the status API reports this).
        Some(_) if !on_cpu => IntraOp::Fixed(1),
        Some(n) => IntraOp::Fixed(n.max(1)),
        // A GPU forward keeps its CPU thread waiting on the device, not computing: it
        // must not take a share of the cores from the CPU models' forwards.
        None if compute_bound && on_cpu => IntraOp::Shared,
        None => IntraOp::Fixed(1),
    };
    let concurrency = match batch_threads {
        Some(n) => n.max(1),
        None if compute_bound && on_cpu => match intra_op {
            IntraOp::Fixed(n) => (cores / n).max(1),
            IntraOp::Shared => cores,
        },
        None => 1,
    };
    Threading {
        concurrency,
        intra_op,
    }
}

/// Intra-op threads for one [`IntraOp::Shared`] forward on forward thread `slot` while
/// `running` forwards (itself included) run on the forward threads: the first slot takes
/// the cores that the others leave, every other slot one. A lone forward (on the first
/// slot, which takes work first) gets every core; two on 2 cores get one each. Only the
/// first slot ever runs a team of OpenMP threads, so libgomp never has more threads than
/// CPUs and keeps spinning between parallel regions instead of sleeping (the torch
/// backend's "forward threads").
pub fn shared_threads(cores: usize, slot: usize, running: usize) -> usize {
    if slot == 0 {
        cores.saturating_sub(running.max(1) - 1).max(1)
    } else {
        1
    }
}

/// The CPUs this process may use.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The batch-1 forward time from which a version gets more than one intra-op thread.
pub const PARALLEL_FROM: std::time::Duration = std::time::Duration::from_millis(1);

/// A loaded model, and for a backend that knows its own signature (TensorFlow) the
/// inputs and outputs it read from it (checked against the manifest's when given).
pub struct Loaded {
    pub model: Arc<dyn Model>,
    pub signature: Option<(
        Vec<crate::bundle::TensorSpec>,
        Vec<crate::bundle::TensorSpec>,
    )>,
}

/// Prepares the process for the backends; call first in `main`, before any thread.
pub fn prepare_process() {
    #[cfg(feature = "tensorflow")]
    tensorflow::prepare_process();
}

/// Loads the model of a bundle. Blocking: call it off the async runtime.
pub fn load(bundle: &Bundle) -> anyhow::Result<Loaded> {
    let none = crate::bundle::ModelSpec::none();
    let spec = bundle.manifest.model.as_ref().unwrap_or(&none);
    let device = DeviceSpec::parse(&spec.device).map_err(anyhow::Error::msg)?;
    let output_names = spec.outputs.iter().map(|o| o.name.clone()).collect();
    match spec.backend {
        BackendKind::Torchscript => Ok(Loaded {
            model: Arc::new(torch::TorchModel::load(
                &bundle.file(&spec.path),
                device,
                output_names,
            )?),
            signature: None,
        }),
        #[cfg(feature = "tensorflow")]
        BackendKind::Tensorflow => {
            if !matches!(device, DeviceSpec::Auto | DeviceSpec::Cpu) {
                anyhow::bail!(
                    "model.device {:?}: the tensorflow backend of this build runs on the CPU only (device = \"cpu\" or \"auto\")",
                    spec.device
                );
            }
            let (model, sig) = tensorflow::TfModel::load(
                &bundle.file(&spec.path),
                &spec.tags(),
                spec.signature(),
                (&spec.inputs, &spec.outputs),
                // One intra-op thread unless the server fixes them: measured faster for
                // quick models (bench/README.md, session 9: digits-tf at c=64 served 9.6k
                // req/s with 1 thread, 7.4k with a pool of the 2 cores), and a
                // compute-bound one runs a forward per core (backend::threading), as
                // libtorch's single-threaded forwards side by side do.
                fixed_threads().unwrap_or(1),
            )?;
            Ok(Loaded {
                model: Arc::new(model),
                signature: Some((sig.inputs, sig.outputs)),
            })
        }
        #[cfg(not(feature = "tensorflow"))]
        BackendKind::Tensorflow => anyhow::bail!(
            "this nnserve was built without the tensorflow feature; build it with `cargo build --release --features tensorflow`"
        ),
        BackendKind::None => Ok(Loaded {
            model: Arc::new(NoModel),
            signature: None,
        }),
    }
}

/// The "model" of a model-less handler bundle: the tensor APIs refuse it before a
/// forward (`api::infer_within`), so this forward never runs.
pub struct NoModel;

impl Model for NoModel {
    fn forward(&self, _: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        Err("this bundle has no model".to_string())
    }
    fn device(&self) -> String {
        "cpu".to_string()
    }
    fn is_none(&self) -> bool {
        true
    }
}

/// Process-wide threading for the backends, set once at start-up before any model
/// loads (libtorch allows setting inter-op threads only once per process). `intra_op`:
/// the server's fixed choice, or `None` to choose per version ([`threading`]).
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
    fn compute_bound_cpu_models_run_a_forward_per_core_with_shared_threads() {
        let cores = cores();
        let quick = Some(Duration::from_micros(50));
        let slow = Some(Duration::from_millis(40));
        let t = |concurrency, intra_op| Threading {
            concurrency,
            intra_op,
        };
        // Quick or unmeasured: one forward at a time, one thread.
        assert_eq!(threading(None, quick, None, true), t(1, IntraOp::Fixed(1)));
        assert_eq!(threading(None, None, None, true), t(1, IntraOp::Fixed(1)));
        // Compute-bound on the CPU: a forward per core, the cores shared among them.
        assert_eq!(threading(None, slow, None, true), t(cores, IntraOp::Shared));
        // On a GPU: one forward at a time, on one CPU thread.
        assert_eq!(threading(None, slow, None, false), t(1, IntraOp::Fixed(1)));
        // --torch-threads does not apply there: the status reports the one thread used.
        assert_eq!(
            threading(Some(4), slow, None, false),
            t(1, IntraOp::Fixed(1))
        );
        // The bundle's num_batch_threads is kept as written.
        assert_eq!(threading(None, slow, Some(1), true), t(1, IntraOp::Shared));
        assert_eq!(
            threading(None, quick, Some(3), true),
            t(3, IntraOp::Fixed(1))
        );
        // --torch-threads fixes the threads; the forwards at once fill the cores.
        assert_eq!(
            threading(Some(3), quick, None, true),
            t(1, IntraOp::Fixed(3))
        );
        assert_eq!(
            threading(Some(1), slow, None, true),
            t(cores, IntraOp::Fixed(1))
        );
        assert_eq!(
            threading(Some(0), slow, Some(2), true),
            t(2, IntraOp::Fixed(1))
        );
    }

    #[test]
    fn shared_threads_give_the_first_slot_the_cores_the_others_leave() {
        // A lone forward on the first slot gets every core.
        assert_eq!(shared_threads(2, 0, 1), 2);
        assert_eq!(shared_threads(16, 0, 1), 16);
        // Two on 2 cores: one each.
        assert_eq!(shared_threads(2, 0, 2), 1);
        assert_eq!(shared_threads(2, 1, 2), 1);
        // The first slot takes what the single-threaded others leave, never less than 1.
        assert_eq!(shared_threads(16, 0, 3), 14);
        assert_eq!(shared_threads(16, 2, 3), 1);
        assert_eq!(shared_threads(2, 0, 5), 1);
        assert_eq!(shared_threads(8, 0, 0), 8);
    }
}
