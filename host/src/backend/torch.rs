//! The libtorch backend (crate `tch`): TorchScript modules on CPU or CUDA.
//!
//! Inputs are copied once into libtorch tensors and moved to the model's device; outputs
//! are moved back and copied once out. A module returning a tensor, a tuple or list of
//! tensors, or a dict of string to tensor is supported; outputs are named from the
//! manifest's `outputs` in order (tuples, lists), by their keys (dicts), and
//! `output_<i>` when the manifest names fewer.

use super::IntraOp;
use crate::bundle::DeviceSpec;
use crate::tensor::{DType, Tensor};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{CModule, Device, IValue, Kind};

pub struct TorchModel {
    module: CModule,
    device: Device,
    output_names: Vec<String>,
    /// Intra-op threads for this model's forwards: a count, [`SHARED`], or 0 (leave the
    /// thread's setting).
    threads: AtomicUsize,
}

/// [`TorchModel::threads`] for [`IntraOp::Shared`].
const SHARED: usize = usize::MAX;

/// Shared-threads forwards running in the process now.
static RUNNING_SHARED: AtomicUsize = AtomicUsize::new(0);

/// Counts one shared-threads forward while it runs.
struct SharedForward;

impl SharedForward {
    /// Enters and returns the threads this forward gets.
    fn enter() -> (SharedForward, usize) {
        let running = RUNNING_SHARED.fetch_add(1, Ordering::AcqRel) + 1;
        (
            SharedForward,
            super::shared_threads(super::cores(), running),
        )
    }
}

impl Drop for SharedForward {
    fn drop(&mut self) {
        RUNNING_SHARED.fetch_sub(1, Ordering::AcqRel);
    }
}

thread_local! {
    /// The intra-op threads last set on this OS thread (libtorch's setting is per thread
    /// with OpenMP), so a forward sets it only when it differs.
    static THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes this thread's forwards use `n` intra-op threads.
fn use_threads(n: usize) {
    THREADS.with(|t| {
        if t.get() != n {
            tch::set_num_threads(n as i32);
            t.set(n);
        }
    });
}

/// Picks the device for a manifest's `device`, or says why it cannot.
pub fn select_device(spec: DeviceSpec) -> anyhow::Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(Device::cuda_if_available()),
        DeviceSpec::Cuda(n) => {
            let count = tch::Cuda::device_count() as usize;
            if n < count {
                Ok(Device::Cuda(n))
            } else if count == 0 {
                anyhow::bail!(
                    "the manifest asks for device cuda:{n} but CUDA is not available on this machine; \
                     set device = \"auto\" (CUDA when present, else CPU) or \"cpu\""
                )
            } else {
                anyhow::bail!(
                    "the manifest asks for device cuda:{n} but this machine has {count} CUDA device(s) (cuda:0..cuda:{})",
                    count - 1
                )
            }
        }
    }
}

impl TorchModel {
    pub fn load(
        path: &Path,
        device: DeviceSpec,
        output_names: Vec<String>,
    ) -> anyhow::Result<TorchModel> {
        let device = select_device(device)?;
        let mut module = CModule::load_on_device(path, device)
            .map_err(|e| anyhow::anyhow!("cannot load TorchScript file {}: {e}", path.display()))?;
        // A module saved in training mode would run dropout and batch-norm in training
        // mode, and batched answers would differ from unbatched ones.
        module.set_eval();
        Ok(TorchModel {
            module,
            device,
            output_names,
            threads: Default::default(),
        })
    }

    fn output_name(&self, i: usize) -> String {
        self.output_names
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("output_{i}"))
    }

    fn collect(&self, value: IValue, out: &mut Vec<(String, Tensor)>) -> Result<(), String> {
        match value {
            IValue::Tensor(t) => {
                let name = self.output_name(out.len());
                out.push((name, from_tch(&t)?));
            }
            IValue::Tuple(items) | IValue::GenericList(items) => {
                for item in items {
                    self.collect(item, out)?;
                }
            }
            IValue::TensorList(items) => {
                for t in items {
                    let name = self.output_name(out.len());
                    out.push((name, from_tch(&t)?));
                }
            }
            IValue::GenericDict(entries) => {
                for (k, v) in entries {
                    let IValue::String(name) = k else {
                        return Err("the model returned a dict with a key that is not a string".into());
                    };
                    let IValue::Tensor(t) = v else {
                        return Err(format!("the model's output '{name}' is not a tensor"));
                    };
                    out.push((name, from_tch(&t)?));
                }
            }
            other => {
                return Err(format!(
                    "the model returned {other:?}; only tensors, tuples, lists and dicts of tensors are supported"
                ))
            }
        }
        Ok(())
    }
}

impl super::Model for TorchModel {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        let _shared = match self.threads.load(Ordering::Relaxed) {
            SHARED => {
                let (guard, n) = SharedForward::enter();
                use_threads(n);
                Some(guard)
            }
            0 => None,
            n => {
                use_threads(n);
                None
            }
        };
        let _no_grad = tch::no_grad_guard();
        let args: Vec<IValue> = inputs
            .iter()
            .map(|t| IValue::Tensor(to_tch(t).to_device(self.device)))
            .collect();
        let value = self.module.forward_is(&args).map_err(|e| {
            // libtorch's messages carry a C++ backtrace; the first lines say what failed.
            let msg = e.to_string();
            let short: Vec<&str> = msg.lines().take(3).collect();
            format!("the model's forward failed: {}", short.join(" "))
        })?;
        let mut out = Vec::new();
        self.collect(value, &mut out)?;
        Ok(out)
    }

    fn set_threads(&self, threads: IntraOp) {
        let n = match threads {
            IntraOp::Fixed(n) => n.max(1),
            IntraOp::Shared => SHARED,
        };
        self.threads.store(n, Ordering::Relaxed);
    }

    fn device(&self) -> String {
        match self.device {
            Device::Cpu => "cpu".into(),
            Device::Cuda(n) => format!("cuda:{n}"),
            other => format!("{other:?}").to_lowercase(),
        }
    }
}

fn kind_of(d: DType) -> Kind {
    match d {
        DType::Bool => Kind::Bool,
        DType::Uint8 => Kind::Uint8,
        DType::Int8 => Kind::Int8,
        DType::Int16 => Kind::Int16,
        DType::Int32 => Kind::Int,
        DType::Int64 => Kind::Int64,
        DType::Fp16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
        DType::Fp32 => Kind::Float,
        DType::Fp64 => Kind::Double,
    }
}

fn dtype_of(k: Kind) -> Option<DType> {
    DType::ALL.into_iter().find(|&d| kind_of(d) == k)
}

fn to_tch(t: &Tensor) -> tch::Tensor {
    tch::Tensor::from_data_size(&t.data, &t.shape, kind_of(t.dtype))
}

fn from_tch(t: &tch::Tensor) -> Result<Tensor, String> {
    let dtype = dtype_of(t.kind()).ok_or_else(|| {
        format!(
            "the model returned a tensor of kind {:?}, which nnserve cannot encode",
            t.kind()
        )
    })?;
    let t = t.to_device(Device::Cpu).contiguous();
    let shape = t.size();
    let numel = t.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut data, numel)
        .map_err(|e| e.to_string())?;
    Ok(Tensor { dtype, shape, data })
}

/// Sets libtorch's thread pools once per process.
pub fn init_threads(intra_op: usize, inter_op: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tch::set_num_interop_threads(inter_op.max(1) as i32);
        tch::set_num_threads(intra_op.max(1) as i32);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_libtorch() {
        let t = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, -4.5]);
        let back = from_tch(&to_tch(&t)).unwrap();
        assert_eq!(back, t);
        let i = Tensor::new(
            DType::Int64,
            vec![3],
            [1i64, -2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap();
        assert_eq!(from_tch(&to_tch(&i)).unwrap(), i);
    }

    #[test]
    fn cuda_request_without_cuda_is_a_clear_error() {
        if tch::Cuda::device_count() > 0 {
            return; // this check is for CPU-only machines; GPU machines test the CUDA path
        }
        let err = select_device(DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("CUDA is not available"), "{err}");
        assert_eq!(select_device(DeviceSpec::Auto).unwrap(), Device::Cpu);
    }
}
