//! KServe v2's inference request over HTTP, decoded: the JSON head (`inputs`, requested
//! `outputs`, `parameters`) and each input's tensor, from JSON `data` or from Triton's
//! binary tail (`binary_data_size`). Errors are messages for a 400; everything of the
//! request quoted back is bounded (`names`).

use crate::codec;
use crate::names;
use crate::tensor::{checked_numel, DType, Tensor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// `POST /v2/models/{m}/infer`'s JSON.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = V2InferRequest))]
pub struct InferRequest {
    /// Echoed in the answer.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub id: Option<Value>,
    /// `binary_data_output: true` asks for every output in binary (Triton's extension).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputTensor>,
    #[serde(default)]
    pub outputs: Vec<RequestedOutput>,
}

/// One entry of `inputs`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = V2InputTensor))]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    /// `BOOL`, `UINT8`...`UINT64`, `INT8`...`INT64`, `FP16`, `BF16`, `FP32`, `FP64`, `BYTES`.
    pub datatype: String,
    /// `binary_data_size`: the tensor's bytes follow the JSON head (Triton's extension).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub parameters: Map<String, Value>,
    /// The elements, flat or nested in row-major order.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<Value>>))]
    pub data: Option<Value>,
}

/// One entry of `outputs`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = V2RequestedOutput))]
pub struct RequestedOutput {
    pub name: String,
    /// `binary_data: true` asks for this output in binary.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub parameters: Map<String, Value>,
}

/// Parses the JSON head of a request.
pub fn parse_request(json: &[u8]) -> Result<InferRequest, String> {
    serde_json::from_slice(json).map_err(|e| format!("malformed inference request: {e}"))
}

/// Every input's tensor, in the request's order: each name once, and the binary tail
/// (after the JSON head) used up exactly.
pub fn decode_inputs(req: &InferRequest, mut tail: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let mut inputs: Vec<(String, Tensor)> = Vec::with_capacity(req.inputs.len());
    let mut names = std::collections::HashSet::with_capacity(req.inputs.len());
    for input in &req.inputs {
        if !names.insert(input.name.as_str()) {
            return Err(format!(
                "input {} appears twice in the request",
                names::shown(&input.name)
            ));
        }
        inputs.push((input.name.clone(), decode_input(input, &mut tail)?));
    }
    if !tail.is_empty() {
        return Err(format!(
            "{} bytes of binary data are left over after the inputs' binary_data_size",
            tail.len()
        ));
    }
    Ok(inputs)
}

/// A v2 input's datatype and element count, checked (over HTTP and gRPC alike).
pub fn input_head(name: &str, datatype: &str, shape: &[i64]) -> Result<(DType, usize), String> {
    let name = names::bounded(name);
    let shown = names::shown_list(shape);
    let dtype = DType::from_v2_name(datatype).ok_or_else(|| {
        format!(
            "input '{name}' has datatype {}, which nnserve does not support (use one of {})",
            names::shown(datatype),
            DType::ALL.map(|d| d.v2_name()).join(", ")
        )
    })?;
    if shape.iter().any(|&d| d < 0) {
        return Err(format!(
            "input '{name}' has a negative size in shape {shown}"
        ));
    }
    let n = checked_numel(shape).ok_or_else(|| {
        format!("input '{name}' has shape {shown}, whose element count does not fit in memory")
    })?;
    Ok((dtype, n))
}

/// One input's tensor, from its JSON `data` or the next `binary_data_size` bytes of `tail`.
pub fn decode_input(input: &InputTensor, tail: &mut &[u8]) -> Result<Tensor, String> {
    let name = &names::bounded(&input.name);
    let shape = names::shown_list(&input.shape);
    let (dtype, want) = input_head(&input.name, &input.datatype, &input.shape)?;
    if let Some(size) = input.parameters.get("binary_data_size") {
        let size = size.as_u64().ok_or_else(|| {
            format!(
                "input '{name}': binary_data_size must be a non-negative integer, not {}",
                names::bounded(&size.to_string())
            )
        })? as usize;
        if input.data.is_some() {
            return Err(format!(
                "input '{name}' has both \"data\" and a binary_data_size parameter; send one"
            ));
        }
        let bytes = codec::take_binary(tail, size, name)?;
        return Tensor::new(dtype, input.shape.clone(), bytes.to_vec())
            .map_err(|e| format!("input '{name}': {e}"));
    }
    let data = input.data.as_ref().ok_or_else(|| {
        format!("input '{name}' has neither \"data\" nor a binary_data_size parameter")
    })?;
    let flat = codec::tensor_from_json(name, data, dtype)?;
    if flat.numel() != want {
        return Err(format!(
            "input '{name}' has {} values but its shape {shape} needs {want}",
            flat.numel()
        ));
    }
    Ok(Tensor {
        dtype,
        shape: input.shape.clone(),
        data: flat.data,
    })
}
