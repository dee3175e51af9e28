//! The host's tensor: an element type, a shape and row-major little-endian bytes.
//!
//! This is the one currency between the HTTP codecs, wasi-nn and the backends. It
//! knows nothing of JSON or libtorch; conversions live with their owners.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element types, named as in the bundle manifest (`fp32`, `int64`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bool,
    Uint8,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::Bool,
        DType::Uint8,
        DType::Int8,
        DType::Int16,
        DType::Int32,
        DType::Int64,
        DType::Fp16,
        DType::Bf16,
        DType::Fp32,
        DType::Fp64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::Uint8 | DType::Int8 => 1,
            DType::Int16 | DType::Fp16 | DType::Bf16 => 2,
            DType::Int32 | DType::Fp32 => 4,
            DType::Int64 | DType::Fp64 => 8,
        }
    }

    /// The KServe v2 / Triton datatype name.
    pub fn v2_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::Uint8 => "UINT8",
            DType::Int8 => "INT8",
            DType::Int16 => "INT16",
            DType::Int32 => "INT32",
            DType::Int64 => "INT64",
            DType::Fp16 => "FP16",
            DType::Bf16 => "BF16",
            DType::Fp32 => "FP32",
            DType::Fp64 => "FP64",
        }
    }

    pub fn from_v2_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.v2_name() == name)
    }

    /// The manifest name (`fp32`).
    pub fn manifest_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::Uint8 => "uint8",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::Fp16 => "fp16",
            DType::Bf16 => "bf16",
            DType::Fp32 => "fp32",
            DType::Fp64 => "fp64",
        }
    }

    /// TF Serving's name in metadata (`DT_FLOAT`).
    pub fn tf_name(self) -> &'static str {
        match self {
            DType::Bool => "DT_BOOL",
            DType::Uint8 => "DT_UINT8",
            DType::Int8 => "DT_INT8",
            DType::Int16 => "DT_INT16",
            DType::Int32 => "DT_INT32",
            DType::Int64 => "DT_INT64",
            DType::Fp16 => "DT_HALF",
            DType::Bf16 => "DT_BFLOAT16",
            DType::Fp32 => "DT_FLOAT",
            DType::Fp64 => "DT_DOUBLE",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.manifest_name())
    }
}

/// A dense tensor. Invariant: `data.len() == numel(shape) * dtype.size()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

/// Number of elements of a shape (1 for a scalar), or `None` when a dimension is
/// negative or the product does not fit in `usize`. Shapes from requests, plugins and
/// manifests go through this (or [`Tensor::new`]) before anything is sized from them.
pub fn checked_numel(shape: &[i64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

/// Bytes of a tensor of `shape` and `dtype`, checked as [`checked_numel`].
pub fn checked_bytes(shape: &[i64], dtype: DType) -> Option<usize> {
    checked_numel(shape)?.checked_mul(dtype.size())
}

/// Number of elements of a shape already checked (a [`Tensor`]'s, or a part of it).
pub fn numel(shape: &[i64]) -> usize {
    checked_numel(shape).unwrap_or(usize::MAX)
}

impl Tensor {
    /// Builds a tensor, checking that the bytes fit the shape.
    pub fn new(dtype: DType, shape: Vec<i64>, data: Vec<u8>) -> Result<Tensor, String> {
        if shape.iter().any(|&d| d < 0) {
            return Err(format!("shape {shape:?} has a negative dimension"));
        }
        // Checked: a shape such as [2^62, 4] would otherwise wrap to 0 bytes and pass
        // with no data, and whatever sizes buffers from the shape would then overrun.
        let want = checked_bytes(&shape, dtype)
            .ok_or_else(|| format!("shape {shape:?} of {dtype} is too large"))?;
        if data.len() != want {
            return Err(format!(
                "shape {shape:?} of {dtype} needs {want} bytes, got {}",
                data.len()
            ));
        }
        Ok(Tensor { dtype, shape, data })
    }

    pub fn from_i64(shape: Vec<i64>, values: &[i64]) -> Tensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor {
            dtype: DType::Int64,
            shape,
            data,
        }
    }

    pub fn from_f32(shape: Vec<i64>, values: &[f32]) -> Tensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor {
            dtype: DType::Fp32,
            shape,
            data,
        }
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The elements as f64, for JSON encoding and tests.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let d = &self.data;
        match self.dtype {
            DType::Bool | DType::Uint8 => d.iter().map(|&b| b as f64).collect(),
            DType::Int8 => d.iter().map(|&b| b as i8 as f64).collect(),
            DType::Int16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
                .collect(),
            DType::Fp16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::Bf16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::Int32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::Fp32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::Int64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::Fp64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        }
    }
}

/// Does `shape` fit the declared shape (`-1` matches any size)? The error names the
/// tensor and both shapes.
pub fn check_shape(name: &str, declared: &[i64], shape: &[i64]) -> Result<(), String> {
    let fits =
        declared.len() == shape.len() && declared.iter().zip(shape).all(|(&d, &s)| d < 0 || d == s);
    if fits {
        Ok(())
    } else {
        Err(format!(
            "input '{name}' has shape {} but the model expects {declared:?} (-1 is any size)",
            crate::names::shown_list(shape)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_byte_length() {
        assert!(Tensor::new(DType::Fp32, vec![2, 3], vec![0; 24]).is_ok());
        let err = Tensor::new(DType::Fp32, vec![2, 3], vec![0; 20]).unwrap_err();
        assert!(err.contains("needs 24 bytes, got 20"), "{err}");
        assert!(Tensor::new(DType::Int8, vec![-1], vec![]).is_err());
    }

    #[test]
    fn shapes_whose_size_overflows_are_refused_not_wrapped() {
        // 2^62 * 4 elements wraps to 0 in unchecked arithmetic: empty data would pass.
        let err = Tensor::new(DType::Fp32, vec![1 << 62, 4], vec![]).unwrap_err();
        assert!(err.contains("too large"), "{err}");
        let err = Tensor::new(DType::Int64, vec![1, 1 << 61], vec![]).unwrap_err();
        assert!(err.contains("too large"), "{err}");
        assert_eq!(checked_numel(&[1 << 62, 4]), None);
        assert_eq!(checked_numel(&[3, 0, 5]), Some(0));
        assert_eq!(checked_bytes(&[2, 3], DType::Fp64), Some(48));
        assert!(Tensor::new(DType::Fp32, vec![0, 4], vec![]).is_ok());
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_v2_name(d.v2_name()), Some(d));
            let toml: DType = serde_json::from_str(&format!("\"{}\"", d.manifest_name())).unwrap();
            assert_eq!(toml, d);
        }
        assert_eq!(DType::from_v2_name("BYTES"), None);
    }

    #[test]
    fn shape_check_honours_wildcards() {
        assert!(check_shape("x", &[-1, 4], &[7, 4]).is_ok());
        assert!(check_shape("x", &[-1, 4], &[7, 5]).is_err());
        let err = check_shape("x", &[-1, 4], &[4]).unwrap_err();
        assert!(err.contains("input 'x' has shape [4]"), "{err}");
    }

    #[test]
    fn values_decode_per_dtype() {
        let t = Tensor::from_f32(vec![2], &[1.5, -2.0]);
        assert_eq!(t.to_f64_vec(), vec![1.5, -2.0]);
        let t = Tensor::new(DType::Int64, vec![1], (-3i64).to_le_bytes().to_vec()).unwrap();
        assert_eq!(t.to_f64_vec(), vec![-3.0]);
    }
}
