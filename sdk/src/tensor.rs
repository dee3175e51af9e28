//! Tensors and the bundle's model over the standard `wasi:nn` interface.

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};
use crate::Error;

pub use tensor::TensorType;

/// A tensor on the plugin's side: a shape, an element type and row-major bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The dimensions, outermost (the batch) first.
    pub shape: Vec<u32>,
    /// The element type.
    pub ty: TensorType,
    /// The elements, row-major, little-endian.
    pub data: Vec<u8>,
}

/// A Rust number type a tensor can hold, with its wasi-nn element type: `f32`, `f64`,
/// `u8`, `i32`, `i64`, and `half::f16` / `half::bf16` (re-exported as [`f16`], [`bf16`]).
pub trait Element: Copy {
    /// Its wasi-nn element type.
    const TYPE: TensorType;
    /// Bytes per element.
    const SIZE: usize;
    /// Appends its little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
    /// Reads one from the first [`Element::SIZE`] bytes.
    fn get(bytes: &[u8]) -> Self;
    /// Its value as `f32` (rounded where it does not fit).
    fn to_f32(self) -> f32;
}

pub use half::{bf16, f16};

macro_rules! element {
    ($t:ty, $ty:ident, $n:expr, $to:expr) => {
        impl Element for $t {
            const TYPE: TensorType = TensorType::$ty;
            const SIZE: usize = $n;
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                a.copy_from_slice(&b[..$n]);
                <$t>::from_le_bytes(a)
            }
            fn to_f32(self) -> f32 {
                #[allow(clippy::redundant_closure_call)]
                ($to)(self)
            }
        }
    };
}

element!(f32, Fp32, 4, |v: f32| v);
element!(f64, Fp64, 8, |v: f64| v as f32);
element!(u8, U8, 1, |v: u8| v as f32);
element!(i32, I32, 4, |v: i32| v as f32);
element!(i64, I64, 8, |v: i64| v as f32);
element!(f16, Fp16, 2, |v: f16| v.to_f32());
element!(bf16, Bf16, 2, |v: bf16| v.to_f32());

impl Tensor {
    /// A tensor of `T` from a row-major slice and its shape, e.g.
    /// `Tensor::new(&[2, 3], &[1i64, 2, 3, 4, 5, 6])`.
    ///
    /// Panics if `data.len()` is not the product of `shape`: that is a bug in the
    /// plugin, not bad input.
    pub fn new<T: Element>(shape: &[u32], data: &[T]) -> Tensor {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        assert_eq!(
            n,
            data.len(),
            "shape {shape:?} needs {n} values, got {}",
            data.len()
        );
        let mut bytes = Vec::with_capacity(data.len() * T::SIZE);
        for &v in data {
            v.put(&mut bytes);
        }
        Tensor {
            shape: shape.to_vec(),
            ty: T::TYPE,
            data: bytes,
        }
    }

    /// An fp32 tensor: `Tensor::new` for `f32`.
    pub fn f32(shape: &[u32], data: &[f32]) -> Tensor {
        Tensor::new(shape, data)
    }

    /// An int64 tensor (token ids, class indices): `Tensor::new` for `i64`.
    pub fn i64(shape: &[u32], data: &[i64]) -> Tensor {
        Tensor::new(shape, data)
    }

    /// A uint8 tensor (pixels): `Tensor::new` for `u8`.
    pub fn u8(shape: &[u32], data: &[u8]) -> Tensor {
        Tensor::new(shape, data)
    }

    /// The number of elements (the product of the shape).
    pub fn len(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as `T`, row-major, when the tensor holds `T` exactly.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, Error> {
        if self.ty != T::TYPE {
            return Err(Error::internal(format!(
                "the tensor holds {:?}, not {:?}",
                self.ty,
                T::TYPE
            )));
        }
        self.check_len(T::SIZE)?;
        Ok(self.data.chunks_exact(T::SIZE).map(T::get).collect())
    }

    /// The values as `f32`, row-major, converted from any element type (a model's
    /// fp16 or fp64 output, int64 class ids, ...).
    pub fn to_f32(&self) -> Result<Vec<f32>, Error> {
        fn all<T: Element>(t: &Tensor) -> Result<Vec<f32>, Error> {
            Ok(t.to_vec::<T>()?.into_iter().map(T::to_f32).collect())
        }
        match self.ty {
            TensorType::Fp32 => self.to_vec::<f32>(),
            TensorType::Fp64 => all::<f64>(self),
            TensorType::Fp16 => all::<f16>(self),
            TensorType::Bf16 => all::<bf16>(self),
            TensorType::U8 => all::<u8>(self),
            TensorType::I32 => all::<i32>(self),
            TensorType::I64 => all::<i64>(self),
        }
    }

    fn check_len(&self, size: usize) -> Result<(), Error> {
        if self.data.len() != self.len() * size {
            return Err(Error::internal(format!(
                "the tensor of shape {:?} holds {} bytes, not {} of {:?}",
                self.shape,
                self.data.len(),
                self.len() * size,
                self.ty
            )));
        }
        Ok(())
    }

    fn into_wasi(self) -> tensor::Tensor {
        tensor::Tensor::new(&self.shape, self.ty, &self.data)
    }

    fn from_wasi(t: &tensor::Tensor) -> Tensor {
        Tensor {
            shape: t.dimensions(),
            ty: t.ty(),
            data: t.data(),
        }
    }
}

/// The model of the bundle being served (or a dependency it declares), loaded through
/// `wasi:nn`. Loading is cheap: the host has the model in memory already.
pub struct Model {
    graph: graph::Graph,
}

impl Model {
    /// This bundle's own model.
    pub fn load() -> Result<Model, Error> {
        Model::load_named("default")
    }

    /// A model by name: this bundle's own model answers to its name and to `default`,
    /// and each model the bundle declares in `[handler] dependencies` to its own name
    /// (a name it did not declare fails the request with a 500 that names the plugin).
    pub fn load_named(name: &str) -> Result<Model, Error> {
        let graph = graph::load_by_name(name).map_err(|e| nn_error("load-by-name", e))?;
        Ok(Model { graph })
    }

    /// Runs the model on named inputs and returns its named outputs.
    pub fn infer(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, Error> {
        let ctx = self
            .graph
            .init_execution_context()
            .map_err(|e| nn_error("init-execution-context", e))?;
        let inputs: Vec<inference::NamedTensor> = inputs
            .into_iter()
            .map(|(n, t)| (n, t.into_wasi()))
            .collect();
        let outputs = ctx.compute(inputs).map_err(|e| nn_error("compute", e))?;
        Ok(outputs
            .iter()
            .map(|(n, t)| (n.clone(), Tensor::from_wasi(t)))
            .collect())
    }

    /// Runs a model with one input and returns its first output.
    pub fn infer_one(&self, input_name: &str, input: Tensor) -> Result<Tensor, Error> {
        self.infer(vec![(input_name.to_string(), input)])?
            .into_iter()
            .next()
            .map(|(_, t)| t)
            .ok_or_else(|| Error::internal("the model returned no output"))
    }
}

/// A wasi-nn error as a plugin error: invalid arguments are the client's fault (400), a
/// name the host does not know is a 404, `timeout` (nnserve: the model's queue is full)
/// is `unavailable`, which nnserve answers as 429 when it refused the compute for that,
/// and the rest are the server's (500).
fn nn_error(op: &str, e: errors::Error) -> Error {
    let msg = format!("wasi-nn {op} failed: {}", e.data());
    match e.code() {
        // The plugin built the tensor: a shape or dtype the model refuses is the
        // plugin's bug (check the request first and answer `bad_request` yourself).
        errors::ErrorCode::InvalidArgument => Error::internal(msg),
        errors::ErrorCode::NotFound => Error::not_found(msg),
        errors::ErrorCode::Timeout => Error::unavailable(msg),
        _ => Error::internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Element + PartialEq + std::fmt::Debug>(values: &[T]) {
        let t = Tensor::new(&[2, values.len() as u32 / 2], values);
        assert_eq!(t.ty, T::TYPE);
        assert_eq!(t.data.len(), values.len() * T::SIZE);
        assert_eq!(t.to_vec::<T>().unwrap(), values);
        let f: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        assert_eq!(t.to_f32().unwrap(), f);
    }

    #[test]
    fn every_element_type_round_trips() {
        round_trip(&[1.5f32, -2.0, 0.0, 3.25]);
        round_trip(&[1.5f64, -2.0, 1e10, 3.25]);
        round_trip(&[0u8, 7, 128, 255]);
        round_trip(&[-1i32, 0, 7, i32::MAX]);
        round_trip(&[-1i64, 0, 30522, 1 << 40]);
        round_trip(&[f16::from_f32(0.5), f16::from_f32(-2.0)]);
        round_trip(&[bf16::from_f32(0.5), bf16::from_f32(-2.0)]);
        assert_eq!(Tensor::i64(&[1], &[9]).to_f32().unwrap(), vec![9.0]);
    }

    #[test]
    fn a_type_or_size_mismatch_is_an_error_not_garbage() {
        let t = Tensor::f32(&[2], &[1.0, 2.0]);
        let e = t.to_vec::<i64>().unwrap_err();
        assert!(format!("{e:?}").contains("Fp32"), "{e:?}");
        let short = Tensor {
            shape: vec![3],
            ty: TensorType::Fp32,
            data: vec![0; 8],
        };
        assert!(short.to_f32().is_err());
    }

    #[test]
    #[should_panic(expected = "needs 6 values")]
    fn a_shape_that_does_not_fit_the_data_is_a_plugin_bug() {
        Tensor::f32(&[2, 3], &[1.0]);
    }
}
