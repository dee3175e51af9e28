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
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tch::{CModule, Device, IValue, Kind};

pub struct TorchModel {
    inner: Arc<Inner>,
    /// Intra-op threads for this model's forwards: a count, [`SHARED`], or 0 (not set
    /// yet: the load's warm-up, which runs on 1 thread).
    threads: AtomicUsize,
}

struct Inner {
    module: CModule,
    device: Device,
    output_names: Vec<String>,
}

/// [`TorchModel::threads`] for [`IntraOp::Shared`].
const SHARED: usize = usize::MAX;

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

// ---------------------------------------------------------------------------------
// The forward threads
//
// libgomp (the OpenMP of the PyTorch wheel) keeps a team of worker threads for each OS
// thread that starts a parallel region, and counts all their workers. Once the process
// has more of them than CPUs, every libgomp thread spins only 100 times (its "throttled"
// count, instead of about 300 000) before it sleeps on a futex, so each of the hundred or
// so parallel regions of a ResNet forward waits for a wake-up: a batch-1 ResNet-18
// forward of 2 threads took 30-38 ms instead of 23-25 ms here (bench/README.md, session 4).
// Forwards on whatever thread reaches the model (the runtime's workers and the blocking
// threads of `block_in_place` take turns) grow such teams on many threads.
//
// So every CPU forward of more than one intra-op thread runs on a pool of `cores()`
// forward threads, and only the first of them ever runs more than one thread under the
// shared policy: the process never has more libgomp threads than CPUs. Forwards of one
// thread (quick models, GPU models, the warm-up) stay on their caller: they start no
// team, and a hand-off would cost more than a quick forward.

/// A forward to run on a pool thread, given its slot and the pool forwards it shares the
/// cores with ([`PoolState::load`]). It returns the hand-back of its result, which the slot calls once
/// it is marked free again: a caller that sends its next forward at once finds the same
/// slot free, and its team of OpenMP threads warm.
type Job = Box<dyn FnOnce(usize, usize) -> Box<dyn FnOnce() + Send> + Send>;

struct ForwardPool {
    state: Arc<Mutex<PoolState>>,
    slots: Vec<mpsc::Sender<(Job, usize)>>,
}

struct PoolState {
    busy: Vec<bool>,
    queue: VecDeque<Job>,
    /// The most pool forwards seen running at once lately, and when.
    recent: usize,
    recent_at: Instant,
}

/// How long a forward starting alone still counts the forwards that ran beside the last
/// ones. Under steady load a forward often starts while the other slots are empty for a
/// moment (their callers are decoding the next requests); given every core, its team
/// would then share them with the forwards that start a millisecond later, and more
/// threads than cores, each spinning, slow everyone (ResNet-18 at 16 clients, one A/B
/// run: p99 768 ms without this rule, 608 ms with it). A lone request after a quiet
/// second gets every core.
const RECENT: Duration = Duration::from_secs(1);

impl PoolState {
    fn running(&self) -> usize {
        self.busy.iter().filter(|&&b| b).count()
    }

    /// The forwards a forward starting now shares the cores with: those running (itself
    /// included), or as many as ran at once within [`RECENT`].
    fn load(&mut self) -> usize {
        let running = self.running();
        let now = Instant::now();
        if running >= self.recent || now.duration_since(self.recent_at) > RECENT {
            self.recent = running;
            self.recent_at = now;
        }
        self.recent.max(running)
    }
}

impl ForwardPool {
    fn get() -> &'static ForwardPool {
        static POOL: OnceLock<ForwardPool> = OnceLock::new();
        POOL.get_or_init(|| ForwardPool::start(super::cores()))
    }

    fn start(n: usize) -> ForwardPool {
        let n = n.max(1);
        let state = Arc::new(Mutex::new(PoolState {
            busy: vec![false; n],
            queue: VecDeque::new(),
            recent: 0,
            recent_at: Instant::now(),
        }));
        let mut slots = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel::<(Job, usize)>();
            slots.push(tx);
            receivers.push(rx);
        }
        for (slot, rx) in receivers.into_iter().enumerate() {
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("nnserve-fwd-{slot}"))
                .spawn(move || {
                    while let Ok((job, running)) = rx.recv() {
                        let mut next = Some((job, running));
                        while let Some((job, running)) = next.take() {
                            // A panic fails only its caller (whose channel closes); the
                            // slot keeps serving.
                            let done =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    job(slot, running)
                                }));
                            {
                                let mut state = state.lock().unwrap();
                                match state.queue.pop_front() {
                                    Some(job) => {
                                        let running = state.load();
                                        next = Some((job, running));
                                    }
                                    None => state.busy[slot] = false,
                                }
                            }
                            if let Ok(done) = done {
                                done();
                            }
                        }
                    }
                })
                .expect("cannot start a forward thread");
        }
        ForwardPool { state, slots }
    }

    /// Runs `job` on the first free forward thread (the first slot when it is free),
    /// or on the first to become free, and waits for its result.
    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(usize, usize) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |slot, running| {
            let result = job(slot, running);
            Box::new(move || {
                let _ = tx.send(result);
            })
        });
        {
            let mut state = self.state.lock().unwrap();
            match state.busy.iter().position(|&b| !b) {
                Some(slot) => {
                    state.busy[slot] = true;
                    let running = state.load();
                    // The slot's thread lives as long as the process.
                    let _ = self.slots[slot].send((job, running));
                }
                None => state.queue.push_back(job),
            }
        }
        rx.recv().ok()
    }
}

/// libtorch's CUDA half, opened on the first question about CUDA devices (never for a
/// server whose versions all run on the CPU). PyTorch splits its backend in two: the
/// CPU library the binary links, and `libtorch_cuda.so`, which registers the CUDA
/// hooks when it is loaded and which no symbol of ours references. Linking it would pull
/// about 3 GB of NVIDIA libraries into every copy of the binary (the release tarball),
/// so it is opened here instead, by name, through the binary's RUNPATH (the build's
/// libtorch directory, or the tarball's `lib/`). `Err`: why CUDA is not available.
pub fn cuda_library() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: dlopen with a NUL-terminated name; the handle is kept for the
            // process's life (never closed), as the hooks it registers must be.
            let handle = unsafe {
                libc::dlopen(
                    c"libtorch_cuda.so".as_ptr(),
                    libc::RTLD_NOW | libc::RTLD_GLOBAL,
                )
            };
            if handle.is_null() {
                // SAFETY: dlerror returns the thread's last error string or null.
                let why = unsafe { libc::dlerror() };
                let why = if why.is_null() {
                    "unknown error".to_string()
                } else {
                    // SAFETY: a NUL-terminated string owned by libc until the next call.
                    unsafe { std::ffi::CStr::from_ptr(why) }
                        .to_string_lossy()
                        .into_owned()
                };
                tracing::debug!("libtorch_cuda.so is not loaded, CPU only: {why}");
                Err(format!(
                    "libtorch's CUDA library could not be opened ({why})"
                ))
            } else {
                Ok(())
            }
        })
        .clone()
}

/// CUDA devices libtorch sees: 0 when its CUDA library cannot be opened.
pub fn cuda_devices() -> usize {
    match cuda_library() {
        Ok(()) => tch::Cuda::device_count().max(0) as usize,
        Err(_) => 0,
    }
}

/// Picks the device for a manifest's `device`, or says why it cannot.
pub fn select_device(spec: DeviceSpec) -> anyhow::Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(if cuda_devices() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceSpec::Cuda(n) => {
            let count = cuda_devices();
            if n < count {
                Ok(Device::Cuda(n))
            } else if count == 0 {
                let why = cuda_library()
                    .err()
                    .map(|e| format!(" ({e}: a CPU-only build or tarball)"))
                    .unwrap_or_default();
                anyhow::bail!(
                    "the manifest asks for device cuda:{n} but CUDA is not available on this machine{why}; \
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
            inner: Arc::new(Inner {
                module,
                device,
                output_names,
            }),
            threads: Default::default(),
        })
    }
}

impl Inner {
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

    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        let _no_grad = tch::no_grad_guard();
        let args = inputs
            .iter()
            .map(|t| {
                let on_device = to_tch(t)?.f_to_device(self.device).map_err(|e| {
                    // Out of memory on a GPU shared with other models lands here.
                    format!(
                        "moving the inputs to {:?} failed: {}",
                        self.device,
                        first_line(&e.to_string())
                    )
                })?;
                Ok(IValue::Tensor(on_device))
            })
            .collect::<Result<Vec<IValue>, String>>()?;
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
}

impl super::Model for TorchModel {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        let threads = match self.threads.load(Ordering::Relaxed) {
            0 => 1,
            n => n,
        };
        if threads == 1 || self.inner.device != Device::Cpu {
            use_threads(1);
            // On the caller's thread (a runtime worker): a panic in tch must fail this
            // forward with a message, as on the pool's threads, not unwind the request.
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.inner.forward(inputs)
            }))
            .unwrap_or_else(|_| Err("the forward failed (a panic in libtorch)".into()));
        }
        let inner = self.inner.clone();
        let cores = super::cores();
        ForwardPool::get()
            .run(move |slot, running| {
                use_threads(match threads {
                    SHARED => super::shared_threads(cores, slot, running),
                    n => n,
                });
                inner.forward(inputs)
            })
            .unwrap_or_else(|| Err("the forward thread failed (a panic in libtorch)".into()))
    }

    fn set_threads(&self, threads: IntraOp) {
        let n = match threads {
            IntraOp::Fixed(n) => n.max(1),
            IntraOp::Shared => SHARED,
        };
        self.threads.store(n, Ordering::Relaxed);
    }

    fn device(&self) -> String {
        match self.inner.device {
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

fn to_tch(t: &Tensor) -> Result<tch::Tensor, String> {
    tch::Tensor::f_from_data_size(&t.data, &t.shape, kind_of(t.dtype)).map_err(|e| {
        format!(
            "making a libtorch tensor of shape {:?} failed: {}",
            t.shape,
            first_line(&e.to_string())
        )
    })
}

/// libtorch's messages carry a C++ backtrace after their first line.
fn first_line(msg: &str) -> &str {
    msg.lines().next().unwrap_or(msg)
}

fn from_tch(t: &tch::Tensor) -> Result<Tensor, String> {
    let dtype = dtype_of(t.kind()).ok_or_else(|| {
        format!(
            "the model returned a tensor of kind {:?}, which nnserve cannot encode",
            t.kind()
        )
    })?;
    let t = t
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(|e| {
            format!(
                "copying an output back from the model's device failed: {}",
                first_line(&e.to_string())
            )
        })?;
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
        let back = from_tch(&to_tch(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let i = Tensor::new(
            DType::Int64,
            vec![3],
            [1i64, -2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap();
        assert_eq!(from_tch(&to_tch(&i).unwrap()).unwrap(), i);
    }

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    #[test]
    fn forwards_one_after_another_stay_on_the_first_forward_thread() {
        // A caller that sends its next forward as soon as it has the last result must
        // find the first slot free again: a second slot would start a second OpenMP team
        // and throttle libgomp for the whole process.
        let pool = ForwardPool::start(2);
        for _ in 0..200 {
            let (name, slot, running) = pool
                .run(|slot, running| (thread_name(), slot, running))
                .unwrap();
            assert_eq!((name.as_str(), slot, running), ("nnserve-fwd-0", 0, 1));
        }
    }

    #[test]
    fn forwards_at_once_take_the_free_slots_and_then_queue() {
        let pool = Arc::new(ForwardPool::start(2));
        let (entered_tx, entered) = mpsc::channel();
        // Starts a forward that reports (slot, running) and holds its slot until released.
        let start = |tag: char| {
            let (release_tx, release) = mpsc::channel::<()>();
            let (pool, entered_tx) = (pool.clone(), entered_tx.clone());
            let call = std::thread::spawn(move || {
                pool.run(move |slot, running| {
                    entered_tx.send((tag, slot, running)).unwrap();
                    release.recv().unwrap();
                })
            });
            (release_tx, call)
        };
        let wait = |ms| entered.recv_timeout(Duration::from_millis(ms));
        let (release_a, a) = start('a');
        assert_eq!(wait(5000), Ok(('a', 0, 1)));
        let (release_b, b) = start('b');
        assert_eq!(wait(5000), Ok(('b', 1, 2)));
        // Both slots busy: the third waits in the queue...
        let (release_c, c) = start('c');
        assert!(wait(200).is_err());
        // ...and runs on the first slot to become free.
        release_a.send(()).unwrap();
        assert_eq!(wait(5000), Ok(('c', 0, 2)));
        release_b.send(()).unwrap();
        release_c.send(()).unwrap();
        for call in [a, b, c] {
            assert_eq!(call.join().unwrap(), Some(()));
        }
        // A lone forward within a second of two at once still shares the cores with the
        // load that was just there; after a quiet second it has them all.
        assert_eq!(pool.run(|slot, running| (slot, running)), Some((0, 2)));
        std::thread::sleep(RECENT + Duration::from_millis(100));
        assert_eq!(pool.run(|slot, running| (slot, running)), Some((0, 1)));
    }

    #[test]
    fn a_panicking_forward_fails_its_caller_and_the_thread_keeps_serving() {
        let pool = ForwardPool::start(1);
        let lost: Option<()> = pool.run(|_, _| panic!("a forward that panics"));
        assert!(lost.is_none());
        assert_eq!(pool.run(|slot, _| slot), Some(0));
    }

    #[test]
    fn a_cuda_device_the_machine_lacks_is_a_clear_error() {
        let count = cuda_devices();
        // Any machine: one past the last device.
        let err = select_device(DeviceSpec::Cuda(count))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("device cuda:{count}")), "{err}");
        if count == 0 {
            assert!(err.contains("CUDA is not available"), "{err}");
            assert!(err.contains("device = \"auto\""), "{err}");
            assert_eq!(select_device(DeviceSpec::Auto).unwrap(), Device::Cpu);
        } else {
            assert!(
                err.contains(&format!("has {count} CUDA device(s)")),
                "{err}"
            );
            assert_eq!(select_device(DeviceSpec::Auto).unwrap(), Device::Cuda(0));
            assert_eq!(select_device(DeviceSpec::Cuda(0)).unwrap(), Device::Cuda(0));
        }
        assert_eq!(select_device(DeviceSpec::Cpu).unwrap(), Device::Cpu);
    }
}
