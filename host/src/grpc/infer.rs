//! `ModelInfer`: the request's tensors (typed `contents` or `raw_input_contents`) into
//! host tensors, the model's outputs back as `raw_output_contents` (what Triton answers
//! and its clients read), and a handler plugin's bundle called through one BYTES input.

use super::pb::model_infer_response::InferOutputTensor;
use super::pb::{InferParameter, ModelInferRequest, ModelInferResponse};
use crate::api::body_call::{
    bytes_element, call_handler as call_handler_with, one_element, split_bytes_elements,
    BODY_OUTPUT, BYTES,
};
use crate::api::{ApiError, AppState};
use crate::lifecycle::ModelVersion;
use crate::names::{bounded, shown};
use crate::tensor::Tensor;
use axum::http::HeaderMap;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// One gRPC inference request, run on whichever version its name resolves to.
#[derive(Clone)]
pub struct GrpcInfer {
    pub req: Arc<ModelInferRequest>,
    /// The call's metadata as HTTP headers (`grpc-timeout` turned into the deadline
    /// header), for the deadline, routers and plugins.
    pub headers: Arc<HeaderMap>,
}

impl crate::api::Run for GrpcInfer {
    type Answer = ModelInferResponse;

    async fn run(
        &self,
        state: &AppState,
        s: &Arc<ModelVersion>,
    ) -> Result<ModelInferResponse, ApiError> {
        let req = &*self.req;
        let datatypes = req.inputs.iter().map(|i| i.datatype.as_str());
        let mut answer = if crate::api::body_call::is_body_call(s, datatypes) {
            call_handler(state, s, req, &self.headers).await?
        } else {
            infer_tensors(state, s, req, &self.headers).await?
        };
        answer.model_name = s.name().to_string();
        answer.model_version = s.version().to_string();
        answer.id = req.id.clone();
        Ok(answer)
    }

    fn route_meta(&self, state: &AppState) -> Result<(crate::routing::Meta, Duration), ApiError> {
        // Routers see the call as the HTTP route of the same request.
        let meta = crate::routing::Meta {
            method: "POST".into(),
            path: format!("/v2/models/{}/infer", self.req.model_name),
            headers: crate::api::header_pairs(&self.headers),
        };
        Ok((meta, state.deadline(&self.headers)?))
    }
}

async fn infer_tensors(
    state: &AppState,
    s: &ModelVersion,
    req: &ModelInferRequest,
    headers: &HeaderMap,
) -> Result<ModelInferResponse, ApiError> {
    let inputs = decode_inputs(req)?;
    // Requested outputs: each once, and only the model's (checked before the forward).
    let mut wanted: Vec<&str> = Vec::new();
    for o in &req.outputs {
        if !wanted.contains(&o.name.as_str()) {
            wanted.push(&o.name);
        }
    }
    let declared = &s.model_spec().outputs;
    if let Some(o) = wanted
        .iter()
        .find(|o| !declared.is_empty() && !declared.iter().any(|d| d.name == **o))
    {
        return Err(ApiError::BadRequest(format!(
            "requested output {} does not exist; the model's outputs are {:?}",
            shown(o),
            declared.iter().map(|d| &d.name).collect::<Vec<_>>()
        )));
    }
    let outputs = crate::api::infer_within(state, headers, s.runner(), inputs).await?;
    let selected: Vec<(String, Tensor)> = if wanted.is_empty() {
        outputs
    } else {
        let mut outputs = outputs;
        let mut picked = Vec::with_capacity(wanted.len());
        for w in wanted {
            let i = outputs.iter().position(|(n, _)| n == w).ok_or_else(|| {
                ApiError::BadRequest(format!("requested output {} does not exist", shown(w)))
            })?;
            picked.push(outputs.swap_remove(i));
        }
        picked
    };
    crate::api::check_answer_size(
        state,
        selected
            .iter()
            .map(|(n, t)| t.data.len() as u64 + n.len() as u64 + 64),
    )?;
    let mut answer = ModelInferResponse::default();
    for (name, t) in selected {
        answer.outputs.push(InferOutputTensor {
            name,
            datatype: t.dtype.v2_name().to_string(),
            shape: t.shape,
            ..Default::default()
        });
        answer.raw_output_contents.push(Bytes::from(t.data));
    }
    Ok(answer)
}

/// The request's inputs as host tensors (nnserve-core's `grpc`, where they are fuzzed):
/// either all in `raw_input_contents` (in the order of `inputs`) or all as typed
/// `contents`.
pub fn decode_inputs(req: &ModelInferRequest) -> Result<Vec<(String, Tensor)>, ApiError> {
    nnserve_core::grpc::decode_infer_inputs(req).map_err(ApiError::BadRequest)
}

fn string_param(
    params: &std::collections::HashMap<String, InferParameter>,
    key: &str,
) -> Option<String> {
    use super::pb::infer_parameter::ParameterChoice;
    match params.get(key)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(s) => Some(s.clone()),
        _ => None,
    }
}

/// A bundle's handler plugin called with the one BYTES element as the request body (its
/// content type from the input's or the request's `content_type` parameter); its answer
/// comes back as the BYTES output `body`, with its `content_type` as a parameter.
async fn call_handler(
    state: &AppState,
    s: &ModelVersion,
    req: &ModelInferRequest,
    headers: &HeaderMap,
) -> Result<ModelInferResponse, ApiError> {
    let input = &req.inputs[0];
    let elements: Vec<Bytes> = if let Some(raw) = req.raw_input_contents.first() {
        split_bytes_elements(raw)
            .map_err(|e| ApiError::BadRequest(format!("input '{}': {e}", bounded(&input.name))))?
            .into_iter()
            .map(|e| raw.slice_ref(e))
            .collect()
    } else {
        input
            .contents
            .as_ref()
            .map(|c| c.bytes_contents.clone())
            .unwrap_or_default()
    };
    let body = one_element(&input.name, elements)?;
    let content_type = string_param(&input.parameters, "content_type")
        .or_else(|| string_param(&req.parameters, "content_type"));
    let answer = call_handler_with(state, s, headers, body, content_type.as_deref()).await?;
    let mut parameters = std::collections::HashMap::new();
    if let Some(ct) = answer.content_type {
        parameters.insert(
            "content_type".to_string(),
            InferParameter {
                parameter_choice: Some(super::pb::infer_parameter::ParameterChoice::StringParam(
                    ct,
                )),
            },
        );
    }
    Ok(ModelInferResponse {
        outputs: vec![InferOutputTensor {
            name: BODY_OUTPUT.into(),
            datatype: BYTES.into(),
            shape: vec![1],
            parameters,
            contents: None,
        }],
        raw_output_contents: vec![Bytes::from(bytes_element(&answer.body))],
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::super::pb::model_infer_request::InferInputTensor;
    use super::super::pb::InferTensorContents;
    use super::*;

    fn input(dtype: &str, shape: Vec<i64>, contents: InferTensorContents) -> ModelInferRequest {
        ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: dtype.into(),
                shape,
                parameters: Default::default(),
                contents: Some(contents),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn typed_contents_become_little_endian_tensors() {
        let req = input(
            "FP32",
            vec![1, 2],
            InferTensorContents {
                fp32_contents: vec![1.5, -2.0],
                ..Default::default()
            },
        );
        let t = &decode_inputs(&req).unwrap()[0].1;
        assert_eq!(t.shape, vec![1, 2]);
        assert_eq!(t.to_f64_vec(), vec![1.5, -2.0]);
        let req = input(
            "INT8",
            vec![1],
            InferTensorContents {
                int_contents: vec![300],
                ..Default::default()
            },
        );
        let e = decode_inputs(&req).unwrap_err();
        assert!(
            e.message().contains("out of the range of INT8"),
            "{}",
            e.message()
        );
        let req = input(
            "FP32",
            vec![3],
            InferTensorContents {
                fp32_contents: vec![1.0],
                ..Default::default()
            },
        );
        let e = decode_inputs(&req).unwrap_err();
        assert!(e.message().contains("needs 3"), "{}", e.message());
    }

    #[test]
    fn raw_contents_must_match_the_shape_and_the_inputs() {
        let mut req = input("FP32", vec![2], InferTensorContents::default());
        req.inputs[0].contents = None;
        req.raw_input_contents = vec![Bytes::from(vec![0u8; 8])];
        assert_eq!(decode_inputs(&req).unwrap()[0].1.data.len(), 8);
        req.raw_input_contents = vec![Bytes::from(vec![0u8; 7])];
        let e = decode_inputs(&req).unwrap_err();
        assert!(
            e.message().contains("needs 8 raw bytes, not 7"),
            "{}",
            e.message()
        );
        req.raw_input_contents = vec![Bytes::new(), Bytes::new()];
        assert!(decode_inputs(&req).is_err());
    }
}
