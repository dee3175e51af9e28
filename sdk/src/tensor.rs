//! Tensors and the bundle's model over the standard `wasi:nn` interface.

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};
use crate::Error;

pub use tensor::TensorType;

/// A tensor on the plugin's side: a shape, an element type and row-major bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<u32>,
    pub ty: TensorType,
    pub data: Vec<u8>,
}

impl Tensor {
    /// An fp32 tensor from a row-major slice and its shape.
    ///
    /// Panics if `data.len()` is not the product of `shape`: that is a bug in the
    /// plugin, not bad input.
    pub fn f32(shape: &[u32], data: &[f32]) -> Tensor {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        assert_eq!(
            n,
            data.len(),
            "shape {shape:?} needs {n} values, got {}",
            data.len()
        );
        let mut bytes = Vec::with_capacity(data.len() * 4);
        for v in data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Tensor {
            shape: shape.to_vec(),
            ty: TensorType::Fp32,
            data: bytes,
        }
    }

    /// The values of an fp32 tensor (fp64 is converted), row-major.
    pub fn to_f32(&self) -> Result<Vec<f32>, Error> {
        match self.ty {
            TensorType::Fp32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            TensorType::Fp64 => Ok(self
                .data
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect()),
            other => Err(Error::internal(format!(
                "model output is {other:?}, expected fp32"
            ))),
        }
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

    /// A model by name: this bundle's own model answers to its name and to `default`.
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
        errors::ErrorCode::InvalidArgument => Error::bad_request(msg),
        errors::ErrorCode::NotFound => Error::not_found(msg),
        errors::ErrorCode::Timeout => Error::unavailable(msg),
        _ => Error::internal(msg),
    }
}
