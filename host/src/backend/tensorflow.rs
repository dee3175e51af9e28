//! TensorFlow SavedModels through the TF C API (crate `tensorflow`, linked at run time:
//! `libtensorflow_cc.so.2` and `libtensorflow_framework.so.2` from the PyPI
//! `tensorflow-cpu` wheel are opened on the first TF load, so a server without TF models
//! never maps them and a machine without them serves everything else).
//!
//! A version is one session on the SavedModel's graph. Inputs and outputs are the
//! signature's (default `serving_default`), keyed by the signature's names, never by the
//! graph's tensor names (`serving_default_x:0` ...). Like `torch`, this module knows
//! tensors, files and threads, nothing of HTTP, Wasm, names of models or batching.

use super::Model;
use crate::bundle::TensorSpec;
use crate::tensor::{DType, Tensor};
use std::path::Path;
use std::sync::OnceLock;
use tensorflow::{
    DataType, Graph, Operation, SavedModelBundle, SessionOptions, SessionRunArgs, TensorType,
};

/// Where the TF libraries are looked for: `TENSORFLOW_DIR` if set, else the directory the
/// build prepared beside the wheel it found (`build.rs`).
pub const BUILD_DIR: Option<&str> = option_env!("NNSERVE_TENSORFLOW_DIR");

/// Where a release tarball keeps the TF libraries, relative to the binary
/// (`bin/nnserve`, `lib/tensorflow/`; scripts/dist.sh).
pub const BESIDE_BINARY: &str = "../lib/tensorflow";

/// Points the TF library finder at the libraries unless the environment names them:
/// beside the binary (a release tarball) first, else the build's directory. Call before
/// any thread starts (it sets an environment variable).
pub fn prepare_process() {
    // TF logs every load at INFO on stderr, outside the server's log; keep its warnings.
    if std::env::var_os("TF_CPP_MIN_LOG_LEVEL").is_none() {
        std::env::set_var("TF_CPP_MIN_LOG_LEVEL", "1");
    }
    if std::env::var_os("TENSORFLOW_DIR").is_none() {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join(BESIDE_BINARY)))
            .filter(|d| d.join("libtensorflow.so").exists());
        let dir = beside.or_else(|| BUILD_DIR.map(std::path::PathBuf::from));
        if let Some(dir) = dir {
            // SAFETY (edition 2021: safe, but racy with other threads): called from main
            // before the runtime or any other thread exists.
            std::env::set_var("TENSORFLOW_DIR", dir);
        }
    }
}

/// Opens the TF libraries once per process; the error says what to do.
fn library() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            tensorflow::library::load().map_err(|e| {
                format!(
                    "the TensorFlow libraries could not be opened ({e}): install the PyPI wheel \
                     tensorflow-cpu 2.21 (`make setup` does) and set TENSORFLOW_DIR to a \
                     directory holding libtensorflow.so (a link to its libtensorflow_cc.so.2) \
                     and libtensorflow_framework.so.2"
                )
            })
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

struct Port {
    /// The signature's name for it.
    name: String,
    op: Operation,
    index: i32,
    dtype: DType,
}

/// A loaded SavedModel.
pub struct TfModel {
    bundle: SavedModelBundle,
    _graph: Graph,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
    intra_op: usize,
}

/// The SavedModel's inputs and outputs as a manifest would declare them.
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

fn dtype_of(t: DataType) -> Option<DType> {
    Some(match t {
        DataType::Float => DType::Fp32,
        DataType::Double => DType::Fp64,
        DataType::Half => DType::Fp16,
        DataType::Int8 => DType::Int8,
        DataType::Int16 => DType::Int16,
        DataType::Int32 => DType::Int32,
        DataType::Int64 => DType::Int64,
        DataType::UInt8 => DType::Uint8,
        DataType::Bool => DType::Bool,
        _ => return None,
    })
}

/// The serialized `ConfigProto` with TF's thread pools: `intra` threads per op, `inter`
/// ops at once (fields 2 and 5, varints). TF's defaults take every core for both.
fn config_proto(intra: usize, inter: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (field, value) in [(2u8, intra), (5u8, inter)] {
        out.push(field << 3);
        let mut v = value.clamp(1, 1 << 20) as u64;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out
}

impl TfModel {
    /// Loads the SavedModel in `dir` with `tags`, and its signature `signature`. `declared`
    /// (the manifest's inputs and outputs, maybe empty) must agree with the signature,
    /// and fixes the order of the inputs; without it the signature's names sorted give it.
    pub fn load(
        dir: &Path,
        tags: &[String],
        signature: &str,
        declared: (&[TensorSpec], &[TensorSpec]),
        intra_op: usize,
    ) -> anyhow::Result<(TfModel, Signature)> {
        library()?;
        let mut options = SessionOptions::new();
        options
            .set_config(&config_proto(intra_op, 1))
            .map_err(|e| anyhow::anyhow!("TensorFlow session options: {e}"))?;
        let mut graph = Graph::new();
        let bundle = SavedModelBundle::load(&options, tags, &mut graph, dir).map_err(|e| {
            anyhow::anyhow!(
                "the SavedModel does not load with tags {tags:?}: {}",
                first_line(&e.to_string())
            )
        })?;
        let def = bundle.meta_graph_def();
        let sig = def.get_signature(signature).map_err(|_| {
            let mut names: Vec<&String> = def.signatures().keys().collect();
            names.sort();
            anyhow::anyhow!(
                "the SavedModel has no signature '{signature}' (it has {names:?}); set model.signature in bundle.toml"
            )
        })?;
        let port = |kind: &str,
                    name: &str,
                    info: &tensorflow::TensorInfo|
         -> anyhow::Result<(Port, TensorSpec)> {
            let dtype = dtype_of(info.dtype()).ok_or_else(|| {
                anyhow::anyhow!(
                    "signature {kind} '{name}' has dtype {}, which nnserve does not serve from TensorFlow yet",
                    info.dtype()
                )
            })?;
            let op = graph
                .operation_by_name_required(&info.name().name)
                .map_err(|e| anyhow::anyhow!("signature {kind} '{name}': {e}"))?;
            let shape: Vec<i64> = match info.shape().dims() {
                Some(n) => (0..n).map(|i| info.shape()[i].unwrap_or(-1)).collect(),
                None => anyhow::bail!(
                    "signature {kind} '{name}' has an unknown rank; export the model with a shape for it (tf.TensorSpec([None, ...]))"
                ),
            };
            Ok((
                Port {
                    name: name.to_string(),
                    op,
                    index: info.name().index,
                    dtype,
                },
                TensorSpec {
                    name: name.to_string(),
                    dtype,
                    shape,
                },
            ))
        };
        let ports = |kind: &str,
                     map: &std::collections::HashMap<String, tensorflow::TensorInfo>,
                     declared: &[TensorSpec]|
         -> anyhow::Result<(Vec<Port>, Vec<TensorSpec>)> {
            let mut names: Vec<&String> = map.keys().collect();
            names.sort();
            if !declared.is_empty() {
                let want: Vec<&String> = declared.iter().map(|t| &t.name).collect();
                let mut sorted = want.clone();
                sorted.sort();
                if sorted != names {
                    anyhow::bail!(
                        "the manifest's {kind} {want:?} are not the signature '{signature}''s {names:?}: \
                         name them as the signature does, or leave model.{kind} out to take them from it"
                    );
                }
                names = want;
            }
            let mut out = (Vec::new(), Vec::new());
            for name in names {
                let (p, spec) = port(kind, name, &map[name])?;
                if let Some(d) = declared.iter().find(|d| &d.name == name) {
                    if d.dtype != spec.dtype {
                        anyhow::bail!(
                            "{kind} '{name}': the manifest says {} but the signature says {}",
                            d.dtype.manifest_name(),
                            spec.dtype.manifest_name()
                        );
                    }
                    let agree = d.shape.len() == spec.shape.len()
                        && d.shape
                            .iter()
                            .zip(&spec.shape)
                            .all(|(&a, &b)| a == b || a == -1 || b == -1);
                    if !agree {
                        anyhow::bail!(
                            "{kind} '{name}': the manifest's shape {:?} disagrees with the signature's {:?}",
                            d.shape,
                            spec.shape
                        );
                    }
                }
                out.0.push(p);
                out.1.push(spec);
            }
            Ok(out)
        };
        let (inputs, input_specs) = ports("inputs", sig.inputs(), declared.0)?;
        let (outputs, output_specs) = ports("outputs", sig.outputs(), declared.1)?;
        Ok((
            TfModel {
                bundle,
                _graph: graph,
                inputs,
                outputs,
                intra_op,
            },
            Signature {
                inputs: input_specs,
                outputs: output_specs,
            },
        ))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// A host tensor as a TF tensor of element type `T` (same little-endian bytes).
fn to_tf<T: TensorType + Copy>(t: &Tensor) -> Result<tensorflow::Tensor<T>, String> {
    let dims: Vec<u64> = t.shape.iter().map(|&d| d.max(0) as u64).collect();
    let mut out = tensorflow::Tensor::<T>::new(&dims);
    if t.data.is_empty() && dims.contains(&0) {
        return Ok(out); // no elements: TF may have no buffer to look at
    }
    let dst: &mut [T] = &mut out;
    let bytes = std::mem::size_of_val(dst);
    if bytes != t.data.len() {
        return Err(format!(
            "a tensor of shape {:?} has {} bytes, not {bytes}",
            t.shape,
            t.data.len()
        ));
    }
    // SAFETY: `dst` is `bytes` long and the host tensor holds exactly that many bytes of
    // the same element type in the same (little-endian, native) layout.
    unsafe {
        std::ptr::copy_nonoverlapping(t.data.as_ptr(), dst.as_mut_ptr() as *mut u8, bytes);
    }
    Ok(out)
}

fn from_tf<T: TensorType + Copy>(
    t: &tensorflow::Tensor<T>,
    dtype: DType,
) -> Result<Tensor, String> {
    let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    if shape.contains(&0) {
        return Tensor::new(dtype, shape, Vec::new()); // no elements, maybe no buffer
    }
    let src: &[T] = t;
    let bytes = std::mem::size_of_val(src);
    let mut data = Vec::with_capacity(bytes);
    // SAFETY: reads the `bytes` bytes of `src` as plain data.
    unsafe {
        data.extend_from_slice(std::slice::from_raw_parts(src.as_ptr() as *const u8, bytes));
    }
    Tensor::new(dtype, shape, data)
}

/// The TF tensors fed in one run (kept alive until it ends), one variant per element
/// type, and the conversions both ways, from one list of (variant, Rust type, DType).
macro_rules! element_types {
    ($($variant:ident($t:ty) = $dtype:ident),* $(,)?) => {
        enum Fed {
            $($variant(tensorflow::Tensor<$t>),)*
        }

        fn feed(t: &Tensor) -> Result<Fed, String> {
            if t.dtype == DType::Bool && t.data.iter().any(|&b| b > 1) {
                return Err("a bool tensor holds a byte other than 0 or 1".into());
            }
            match t.dtype {
                $(DType::$dtype => Ok(Fed::$variant(to_tf(t)?)),)*
                other => Err(format!(
                    "{} tensors are not served from TensorFlow yet",
                    other.manifest_name()
                )),
            }
        }

        impl Fed {
            fn add_to<'a>(&'a self, args: &mut SessionRunArgs<'a>, op: &Operation, index: i32) {
                match self {
                    $(Fed::$variant(t) => args.add_feed(op, index, t),)*
                }
            }
        }

        /// Fetches output `token` as a host tensor of `dtype`.
        fn fetch(
            args: &mut SessionRunArgs<'_>,
            token: tensorflow::FetchToken,
            dtype: DType,
        ) -> Result<Tensor, String> {
            match dtype {
                $(DType::$dtype => from_tf(&args.fetch::<$t>(token).map_err(|e| first_line(&e.to_string()).to_string())?, dtype),)*
                other => Err(format!(
                    "{} tensors are not served from TensorFlow yet",
                    other.manifest_name()
                )),
            }
        }
    };
}

element_types! {
    F32(f32) = Fp32,
    F64(f64) = Fp64,
    F16(half::f16) = Fp16,
    I8(i8) = Int8,
    I16(i16) = Int16,
    I32(i32) = Int32,
    I64(i64) = Int64,
    U8(u8) = Uint8,
    Bool(bool) = Bool,
}

impl Model for TfModel {
    fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, Tensor)>, String> {
        if inputs.len() != self.inputs.len() {
            return Err(format!(
                "the model takes {} inputs, not {}",
                self.inputs.len(),
                inputs.len()
            ));
        }
        let fed = inputs
            .iter()
            .zip(&self.inputs)
            .map(|(t, p)| {
                if t.dtype != p.dtype {
                    return Err(format!(
                        "input '{}' is {}, the model takes {}",
                        p.name,
                        t.dtype.manifest_name(),
                        p.dtype.manifest_name()
                    ));
                }
                feed(t)
            })
            .collect::<Result<Vec<Fed>, String>>()?;
        let mut args = SessionRunArgs::new();
        for (f, p) in fed.iter().zip(&self.inputs) {
            f.add_to(&mut args, &p.op, p.index);
        }
        let tokens: Vec<_> = self
            .outputs
            .iter()
            .map(|p| args.request_fetch(&p.op, p.index))
            .collect();
        self.bundle
            .session
            .run(&mut args)
            .map_err(|e| format!("the model's forward failed: {}", first_line(&e.to_string())))?;
        let mut out = Vec::with_capacity(self.outputs.len());
        for (p, token) in self.outputs.iter().zip(tokens) {
            let t = fetch(&mut args, token, p.dtype)
                .map_err(|e| format!("output '{}': {e}", p.name))?;
            out.push((p.name.clone(), t));
        }
        Ok(out)
    }

    fn device(&self) -> String {
        "cpu".into()
    }

    fn fixed_intra_op(&self) -> Option<super::IntraOp> {
        Some(super::IntraOp::Fixed(self.intra_op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_config_is_the_config_proto_encoding() {
        // intra_op_parallelism_threads = 2, inter_op_parallelism_threads = 1
        assert_eq!(config_proto(2, 1), vec![0x10, 2, 0x28, 1]);
        // 300 as a varint
        assert_eq!(config_proto(300, 1), vec![0x10, 0xac, 0x02, 0x28, 1]);
    }
}
