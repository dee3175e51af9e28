//! gRPC requests' tensors, decoded: KServe v2's `ModelInfer` (typed `contents` or
//! `raw_input_contents`) and TF Serving's `TensorProto` (`tensor_content` or a typed
//! list, one value filling the shape). The messages are prost's, generated from
//! `proto/` by build.rs; the server's services (tonic) use these same types. Errors are
//! messages for an `INVALID_ARGUMENT`; everything of the request quoted back is bounded
//! (`names`).

use crate::names::{bounded, shown, shown_list};
use crate::tensor::{checked_numel, DType, Tensor};
use bytes::Bytes;

/// KServe v2's gRPC messages (package `inference`).
#[allow(clippy::all, missing_docs)]
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// TensorFlow's and TF Serving's messages (packages `tensorflow`, `tensorflow.error`,
/// `tensorflow.serving`).
#[allow(clippy::all, missing_docs)]
pub mod tensorflow {
    include!(concat!(env!("OUT_DIR"), "/tensorflow.rs"));
    pub mod error {
        include!(concat!(env!("OUT_DIR"), "/tensorflow.error.rs"));
    }
    pub mod serving {
        include!(concat!(env!("OUT_DIR"), "/tensorflow.serving.rs"));
    }
}

use inference::model_infer_request::InferInputTensor;
use inference::{InferTensorContents, ModelInferRequest};
use tensorflow::{DataType, TensorProto, TensorShapeProto};

/// The datatype of a KServe tensor of byte strings.
pub const BYTES: &str = "BYTES";

/// A `ModelInfer` request's inputs as tensors: either all in `raw_input_contents` (in
/// the order of `inputs`) or all as typed `contents`. BYTES inputs are refused (they go
/// to a handler plugin, which the server calls before this).
pub fn decode_infer_inputs(req: &ModelInferRequest) -> Result<Vec<(String, Tensor)>, String> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(format!(
            "the request has {} inputs but {} raw_input_contents; send one raw entry per input, in order",
            req.inputs.len(),
            req.raw_input_contents.len()
        ));
    }
    let mut out: Vec<(String, Tensor)> = Vec::with_capacity(req.inputs.len().min(64));
    for (i, input) in req.inputs.iter().enumerate() {
        if out.iter().any(|(n, _)| *n == input.name) {
            return Err(format!(
                "input {} appears twice in the request",
                shown(&input.name)
            ));
        }
        let t = if raw {
            if input.contents.is_some() {
                return Err(format!(
                    "input {} has contents although the request uses raw_input_contents; send one form",
                    shown(&input.name)
                ));
            }
            decode_raw(input, &req.raw_input_contents[i])?
        } else {
            decode_typed(input)?
        };
        out.push((input.name.clone(), t));
    }
    Ok(out)
}

/// The input's datatype and element count, checked.
fn dtype_and_numel(input: &InferInputTensor) -> Result<(DType, usize), String> {
    if input.datatype == BYTES {
        return Err(format!(
            "input '{}' is BYTES, which this model does not take: BYTES goes to a model with a \
             handler plugin, as its only input (docs/grpc.md)",
            bounded(&input.name)
        ));
    }
    crate::v2::input_head(&input.name, &input.datatype, &input.shape)
}

fn decode_raw(input: &InferInputTensor, raw: &Bytes) -> Result<Tensor, String> {
    let (dtype, n) = dtype_and_numel(input)?;
    let want = n.checked_mul(dtype.size()).unwrap_or(usize::MAX);
    if raw.len() != want {
        return Err(format!(
            "input '{}' of shape {} and datatype {} needs {want} raw bytes, not {}",
            bounded(&input.name),
            shown_list(&input.shape),
            dtype.v2_name(),
            raw.len()
        ));
    }
    Tensor::new(dtype, input.shape.clone(), raw.to_vec())
        .map_err(|e| format!("input '{}': {e}", bounded(&input.name)))
}

fn decode_typed(input: &InferInputTensor) -> Result<Tensor, String> {
    let (dtype, n) = dtype_and_numel(input)?;
    let name = bounded(&input.name);
    let empty = InferTensorContents::default();
    let c = input.contents.as_ref().unwrap_or(&empty);
    let wrong_count = |got: usize, list: &str| {
        format!(
            "input '{name}' has {got} values in {list} but its shape {} needs {n}",
            shown_list(&input.shape)
        )
    };
    let out_of_range = |list: &str| {
        format!(
            "input '{name}': a value in {list} is out of the range of {}",
            dtype.v2_name()
        )
    };
    macro_rules! take {
        ($list:ident, $name:literal, |$v:ident| $conv:expr) => {{
            // The list holds exactly `n` values, so the tensor is at most a few times
            // the size of the message that carried them.
            if c.$list.len() != n {
                return Err(wrong_count(c.$list.len(), $name));
            }
            let mut data = Vec::with_capacity(n * dtype.size());
            for &$v in &c.$list {
                data.extend_from_slice(&($conv).ok_or_else(|| out_of_range($name))?.to_le_bytes());
            }
            data
        }};
    }
    let data = match dtype {
        DType::Bool => take!(bool_contents, "bool_contents", |v| Some(v as u8)),
        DType::Uint8 => take!(uint_contents, "uint_contents", |v| u8::try_from(v).ok()),
        DType::Int8 => take!(int_contents, "int_contents", |v| i8::try_from(v).ok()),
        DType::Int16 => take!(int_contents, "int_contents", |v| i16::try_from(v).ok()),
        DType::Int32 => take!(int_contents, "int_contents", |v| Some(v)),
        DType::Int64 => take!(int64_contents, "int64_contents", |v| Some(v)),
        DType::Fp32 => take!(fp32_contents, "fp32_contents", |v| Some(v)),
        DType::Fp64 => take!(fp64_contents, "fp64_contents", |v| Some(v)),
        DType::Fp16 | DType::Bf16 => {
            return Err(format!(
                "input '{name}' is {}, which travels only in raw_input_contents (the protocol has no typed list for it)",
                dtype.v2_name()
            ))
        }
    };
    Tensor::new(dtype, input.shape.clone(), data).map_err(|e| format!("input '{name}': {e}"))
}

/// TensorFlow's dtype as ours; the dtype's name when we serve no such dtype.
pub fn dtype_of(d: i32) -> Result<DType, String> {
    Ok(match DataType::try_from(d) {
        Ok(DataType::DtFloat) => DType::Fp32,
        Ok(DataType::DtDouble) => DType::Fp64,
        Ok(DataType::DtInt32) => DType::Int32,
        Ok(DataType::DtUint8) => DType::Uint8,
        Ok(DataType::DtInt16) => DType::Int16,
        Ok(DataType::DtInt8) => DType::Int8,
        Ok(DataType::DtInt64) => DType::Int64,
        Ok(DataType::DtBool) => DType::Bool,
        Ok(DataType::DtHalf) => DType::Fp16,
        Ok(DataType::DtBfloat16) => DType::Bf16,
        Ok(other) => return Err(other.as_str_name().to_string()),
        Err(_) => return Err(format!("dtype {d}")),
    })
}

/// Our dtype as TensorFlow's.
pub fn data_type(d: DType) -> DataType {
    match d {
        DType::Fp32 => DataType::DtFloat,
        DType::Fp64 => DataType::DtDouble,
        DType::Int32 => DataType::DtInt32,
        DType::Uint8 => DataType::DtUint8,
        DType::Int16 => DataType::DtInt16,
        DType::Int8 => DataType::DtInt8,
        DType::Int64 => DataType::DtInt64,
        DType::Bool => DataType::DtBool,
        DType::Fp16 => DataType::DtHalf,
        DType::Bf16 => DataType::DtBfloat16,
    }
}

fn shape_of(name: &str, shape: Option<&TensorShapeProto>) -> Result<Vec<i64>, String> {
    let shape = shape.ok_or_else(|| format!("input '{}' has no tensor_shape", bounded(name)))?;
    if shape.unknown_rank {
        return Err(format!(
            "input '{}' has an unknown rank; send its shape",
            bounded(name)
        ));
    }
    let dims: Vec<i64> = shape.dim.iter().map(|d| d.size).collect();
    if dims.iter().any(|&d| d < 0) {
        return Err(format!(
            "input '{}' has a negative size in shape {}",
            bounded(name),
            shown_list(&dims)
        ));
    }
    Ok(dims)
}

/// A request's TensorProto as a tensor: `tensor_content` (little-endian, row-major), or
/// the typed list of its dtype, where one value fills the whole shape (as TensorFlow
/// reads it). A filled tensor may not take more than `max_bytes` (the server's
/// max_request_bytes): one value and a huge shape must not allocate terabytes.
pub fn tensor_from_proto(name: &str, p: &TensorProto, max_bytes: usize) -> Result<Tensor, String> {
    let bad = |m: String| format!("input '{}': {m}", bounded(name));
    let dtype = dtype_of(p.dtype).map_err(|d| {
        bad(format!(
            "{d} is not a dtype nnserve serves (DT_FLOAT, DT_DOUBLE, DT_INT8/16/32/64, DT_UINT8, DT_BOOL, DT_HALF, DT_BFLOAT16; DT_STRING goes to a model with a handler plugin)"
        ))
    })?;
    let shape = shape_of(name, p.tensor_shape.as_ref())?;
    let n = checked_numel(&shape)
        .ok_or_else(|| bad("its element count does not fit in memory".into()))?;
    if !p.tensor_content.is_empty() {
        let want = n.checked_mul(dtype.size()).unwrap_or(usize::MAX);
        if p.tensor_content.len() != want {
            return Err(bad(format!(
                "shape {} of {} needs {want} bytes of tensor_content, not {}",
                shown_list(&shape),
                dtype.tf_name(),
                p.tensor_content.len()
            )));
        }
        return Tensor::new(dtype, shape, p.tensor_content.to_vec()).map_err(bad);
    }
    let bytes = n.saturating_mul(dtype.size());
    if bytes > max_bytes {
        return Err(bad(format!(
            "shape {} of {} takes {bytes} bytes, over the server's max_request_bytes of {max_bytes}",
            shown_list(&shape),
            dtype.tf_name()
        )));
    }
    macro_rules! take {
        ($list:expr, $what:literal, |$v:ident| $conv:expr) => {{
            let list = &$list;
            if !(list.len() == n || (list.len() == 1 && n > 1)) {
                return Err(bad(format!(
                    "{} values in {} for shape {}, which needs {n} (or one, to fill it)",
                    list.len(),
                    $what,
                    shown_list(&shape)
                )));
            }
            let mut data = Vec::with_capacity(n * dtype.size());
            for i in 0..n {
                let $v = list[if list.len() == 1 { 0 } else { i }];
                let value =
                    ($conv).ok_or_else(|| bad(format!("a value in {} is out of range", $what)))?;
                data.extend_from_slice(&value.to_le_bytes());
            }
            data
        }};
    }
    let data = match dtype {
        DType::Fp32 => take!(p.float_val, "float_val", |v| Some(v)),
        DType::Fp64 => take!(p.double_val, "double_val", |v| Some(v)),
        DType::Int32 => take!(p.int_val, "int_val", |v| Some(v)),
        DType::Int16 => take!(p.int_val, "int_val", |v| i16::try_from(v).ok()),
        DType::Int8 => take!(p.int_val, "int_val", |v| i8::try_from(v).ok()),
        DType::Uint8 => take!(p.int_val, "int_val", |v| u8::try_from(v).ok()),
        DType::Int64 => take!(p.int64_val, "int64_val", |v| Some(v)),
        DType::Bool => take!(p.bool_val, "bool_val", |v| Some(v as u8)),
        DType::Fp16 | DType::Bf16 => {
            take!(p.half_val, "half_val", |v| u16::try_from(v as u32 & 0xffff)
                .ok())
        }
    };
    Tensor::new(dtype, shape, data).map_err(bad)
}

/// A tensor as TF Serving answers it: `tensor_content`.
pub fn tensor_to_proto(t: Tensor) -> TensorProto {
    TensorProto {
        dtype: data_type(t.dtype) as i32,
        tensor_shape: Some(shape_proto(&t.shape)),
        tensor_content: Bytes::from(t.data),
        ..Default::default()
    }
}

/// A shape as TensorFlow writes it.
pub fn shape_proto(shape: &[i64]) -> TensorShapeProto {
    TensorShapeProto {
        dim: shape
            .iter()
            .map(|&size| tensorflow::tensor_shape_proto::Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}
