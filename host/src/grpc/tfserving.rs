//! TensorFlow Serving's gRPC services (`tensorflow.serving.PredictionService` and
//! `ModelService`, proto/tensorflow_serving), so `tensorflow-serving-api`'s stubs work
//! unchanged, for TorchScript and TensorFlow models alike: `Predict` (through the same
//! request path as every other protocol), `GetModelMetadata` (the signature from the
//! manifest) and `GetModelStatus` (every version's state, as over REST). Errors as TF
//! Serving gives them: NOT_FOUND for a missing model, version or label,
//! FAILED_PRECONDITION for a version that is not available, INVALID_ARGUMENT naming the
//! offending input.

use crate::api::{ApiError, AppState};
use crate::lifecycle::{ModelVersion, ResolveError};
use crate::names::shown;
use crate::tensor::Tensor;
use axum::http::HeaderMap;
use nnserve_core::grpc::{data_type, shape_proto, tensor_to_proto};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tfpb::tensorflow::serving;
use tfpb::tensorflow::{DataType, TensorProto};
use tonic::{Request, Response, Status};

/// The messages of proto/tensorflow* (nnserve-core's) and the server traits generated
/// over them (build.rs).
#[allow(clippy::all, missing_docs)]
pub mod tfpb {
    pub mod tensorflow {
        pub use nnserve_core::grpc::tensorflow::*;
        pub mod serving {
            pub use nnserve_core::grpc::tensorflow::serving::*;
            tonic::include_proto!("tensorflow.serving");
        }
    }
}

/// The signature every model answers under (a TF model's own, from its manifest, too).
const DEFAULT_SIGNATURE: &str = "serving_default";

pub struct TfServing {
    pub state: AppState,
}

/// An error as TF Serving's status.
fn status(e: ApiError) -> Status {
    super::status(e)
}

/// The model a request names, and its version or label, checked; a version that exists
/// but is not available is FAILED_PRECONDITION, as TF Serving answers.
fn target(
    state: &AppState,
    spec: Option<&serving::ModelSpec>,
) -> Result<(String, Option<u64>, Option<String>), Status> {
    use serving::model_spec::VersionChoice;
    let spec = spec.ok_or_else(|| Status::invalid_argument("model_spec is missing"))?;
    let name = crate::api::model_name(&spec.name)
        .map_err(status)?
        .to_string();
    let (version, label) = match &spec.version_choice {
        None => (None, None),
        Some(VersionChoice::Version(v)) => {
            let v = u64::try_from(*v)
                .ok()
                .and_then(|v| crate::names::check_version(v).ok())
                .ok_or_else(|| {
                    Status::invalid_argument(format!("version {v} is not a version (1 to 2^63-1)"))
                })?;
            (Some(v), None)
        }
        Some(VersionChoice::VersionLabel(l)) => (None, Some(l.clone())),
    };
    let version_now = match &label {
        Some(l) => Some(
            state
                .registry
                .label(&name, l)
                .map_err(not_found_or_precondition)?,
        ),
        None => version,
    };
    state
        .registry
        .resolve(&name, version_now)
        .map_err(not_found_or_precondition)?;
    Ok((name, version, label))
}

fn not_found_or_precondition(e: ResolveError) -> Status {
    match e {
        ResolveError::NotAvailable(..) => Status::failed_precondition(e.to_string()),
        _ => Status::not_found(e.to_string()),
    }
}

fn signature_check(spec: &serving::ModelSpec, s: &ModelVersion) -> Result<(), ApiError> {
    let served = s.model_spec().signature();
    let asked = spec.signature_name.as_str();
    if asked.is_empty() || asked == DEFAULT_SIGNATURE || asked == served {
        return Ok(());
    }
    Err(ApiError::BadRequest(format!(
        "signature {} is not served; model '{}' serves {DEFAULT_SIGNATURE}",
        shown(asked),
        s.name()
    )))
}

/// A request's TensorProto as a host tensor (nnserve-core's `grpc`, where it is
/// fuzzed): `tensor_content`, or the typed list of its dtype, one value filling the
/// shape; a filled tensor takes at most `max_bytes`.
pub fn tensor_from_proto(
    name: &str,
    p: &TensorProto,
    max_bytes: usize,
) -> Result<Tensor, ApiError> {
    nnserve_core::grpc::tensor_from_proto(name, p, max_bytes).map_err(ApiError::BadRequest)
}

/// The answer's model_spec: the version that served, under the default signature.
fn served_spec(s: &ModelVersion) -> serving::ModelSpec {
    serving::ModelSpec {
        name: s.name().to_string(),
        signature_name: DEFAULT_SIGNATURE.into(),
        version_choice: Some(serving::model_spec::VersionChoice::Version(
            s.version() as i64
        )),
    }
}

/// One `Predict`, run on whichever version its name resolves to (an endpoint's variant).
#[derive(Clone)]
struct Predict {
    req: Arc<serving::PredictRequest>,
    headers: Arc<HeaderMap>,
}

impl crate::api::Run for Predict {
    type Answer = serving::PredictResponse;

    async fn run(
        &self,
        state: &AppState,
        s: &Arc<ModelVersion>,
    ) -> Result<serving::PredictResponse, ApiError> {
        let req = &*self.req;
        if let Some(spec) = &req.model_spec {
            signature_check(spec, s)?;
        }
        let strings = req.inputs.values().map(|t| {
            if t.dtype == DataType::DtString as i32 {
                crate::api::body_call::BYTES
            } else {
                ""
            }
        });
        if crate::api::body_call::is_body_call(s, strings) {
            return body_call(state, s, req, &self.headers).await;
        }
        let mut inputs = Vec::with_capacity(req.inputs.len());
        for (name, t) in &req.inputs {
            inputs.push((
                name.clone(),
                tensor_from_proto(name, t, state.max_request_bytes)?,
            ));
        }
        let declared = &s.model_spec().outputs;
        if let Some(o) = req
            .output_filter
            .iter()
            .find(|o| !declared.iter().any(|d| &d.name == *o))
        {
            return Err(ApiError::BadRequest(format!(
                "output_filter names {}, which is not an output; the model's outputs are {:?}",
                shown(o),
                declared.iter().map(|d| &d.name).collect::<Vec<_>>()
            )));
        }
        let outputs = crate::api::infer_within(state, &self.headers, s.runner(), inputs).await?;
        crate::api::check_answer_size(
            state,
            outputs
                .iter()
                .map(|(n, t)| t.data.len() as u64 + n.len() as u64 + 64),
        )?;
        let outputs = outputs
            .into_iter()
            .filter(|(n, _)| req.output_filter.is_empty() || req.output_filter.contains(n))
            .map(|(n, t)| (n, tensor_to_proto(t)))
            .collect();
        Ok(serving::PredictResponse {
            model_spec: Some(served_spec(s)),
            outputs,
        })
    }

    fn route_meta(&self, state: &AppState) -> Result<(crate::routing::Meta, Duration), ApiError> {
        let name = self.req.model_spec.as_ref().map_or("", |m| m.name.as_str());
        let meta = crate::routing::Meta {
            method: "POST".into(),
            path: format!("/v1/models/{name}:predict"),
            headers: crate::api::header_pairs(&self.headers),
        };
        Ok((meta, state.deadline(&self.headers)?))
    }
}

/// A handler plugin's bundle through `Predict`: one DT_STRING input of one element, the
/// request body; the answer is the DT_STRING output `body`.
async fn body_call(
    state: &AppState,
    s: &ModelVersion,
    req: &serving::PredictRequest,
    headers: &HeaderMap,
) -> Result<serving::PredictResponse, ApiError> {
    use crate::api::body_call::{call_handler, one_element, BODY_OUTPUT};
    let (name, t) = req.inputs.iter().next().expect("one input");
    let body = one_element(name, t.string_val.clone())?;
    let answer = call_handler(state, s, headers, body, None).await?;
    let mut outputs = HashMap::new();
    outputs.insert(
        BODY_OUTPUT.to_string(),
        TensorProto {
            dtype: DataType::DtString as i32,
            tensor_shape: Some(shape_proto(&[1])),
            string_val: vec![answer.body],
            ..Default::default()
        },
    );
    Ok(serving::PredictResponse {
        model_spec: Some(served_spec(s)),
        outputs,
    })
}

fn signature_def(s: &ModelVersion) -> tfpb::tensorflow::SignatureDef {
    let spec = s.model_spec();
    let infos =
        |list: &[crate::bundle::TensorSpec]| -> HashMap<String, tfpb::tensorflow::TensorInfo> {
            list.iter()
                .map(|t| {
                    let info = tfpb::tensorflow::TensorInfo {
                        encoding: Some(tfpb::tensorflow::tensor_info::Encoding::Name(
                            t.name.clone(),
                        )),
                        dtype: data_type(t.dtype) as i32,
                        tensor_shape: Some(shape_proto(&t.shape)),
                    };
                    (t.name.clone(), info)
                })
                .collect()
        };
    tfpb::tensorflow::SignatureDef {
        inputs: infos(&spec.inputs),
        outputs: infos(&spec.outputs),
        method_name: "tensorflow/serving/predict".into(),
    }
}

#[tonic::async_trait]
impl serving::prediction_service_server::PredictionService for TfServing {
    async fn predict(
        &self,
        request: Request<serving::PredictRequest>,
    ) -> Result<Response<serving::PredictResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let result = async {
            let headers = super::call_headers(metadata)?;
            let (name, version, label) = target(&self.state, req.model_spec.as_ref())?;
            let call = Predict {
                req: Arc::new(req),
                headers: Arc::new(headers),
            };
            let (result, _) =
                crate::api::serve(&self.state, &name, version, label.as_deref(), call)
                    .await
                    .map_err(status)?;
            result.map(Response::new).map_err(status)
        };
        let result = result.await;
        super::count(&self.state, &result);
        result
    }

    async fn get_model_metadata(
        &self,
        request: Request<serving::GetModelMetadataRequest>,
    ) -> Result<Response<serving::GetModelMetadataResponse>, Status> {
        let req = request.into_inner();
        let result = (|| {
            if req.metadata_field.is_empty() {
                return Err(Status::invalid_argument(
                    "metadata_field is empty; ask for \"signature_def\"",
                ));
            }
            if let Some(f) = req.metadata_field.iter().find(|f| *f != "signature_def") {
                return Err(Status::invalid_argument(format!(
                    "metadata field {} is not served; nnserve serves \"signature_def\"",
                    shown(f)
                )));
            }
            let (name, version, label) = target(&self.state, req.model_spec.as_ref())?;
            let s = crate::api::resolve_model(&self.state, &name, version, label.as_deref())
                .map_err(status)?;
            let mut defs = HashMap::new();
            defs.insert(DEFAULT_SIGNATURE.to_string(), signature_def(&s));
            let map = serving::SignatureDefMap {
                signature_def: defs,
            };
            let mut metadata = HashMap::new();
            metadata.insert(
                "signature_def".to_string(),
                prost_types::Any {
                    type_url: "type.googleapis.com/tensorflow.serving.SignatureDefMap".into(),
                    value: prost::Message::encode_to_vec(&map),
                },
            );
            Ok(Response::new(serving::GetModelMetadataResponse {
                model_spec: Some(served_spec(&s)),
                metadata,
            }))
        })();
        super::count(&self.state, &result);
        result
    }

    async fn classify(
        &self,
        _: Request<serving::ClassificationRequest>,
    ) -> Result<Response<serving::ClassificationResponse>, Status> {
        Err(unserved("Classify"))
    }

    async fn regress(
        &self,
        _: Request<serving::RegressionRequest>,
    ) -> Result<Response<serving::RegressionResponse>, Status> {
        Err(unserved("Regress"))
    }

    async fn multi_inference(
        &self,
        _: Request<serving::MultiInferenceRequest>,
    ) -> Result<Response<serving::MultiInferenceResponse>, Status> {
        Err(unserved("MultiInference"))
    }
}

fn unserved(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not served by nnserve (it needs tf.Example inputs); use Predict"
    ))
}

#[tonic::async_trait]
impl serving::model_service_server::ModelService for TfServing {
    async fn get_model_status(
        &self,
        request: Request<serving::GetModelStatusRequest>,
    ) -> Result<Response<serving::GetModelStatusResponse>, Status> {
        use serving::model_version_status::State as S;
        let admin = crate::api::is_admin(&self.state, &request.metadata().clone().into_headers());
        let req = request.into_inner();
        let result = (|| {
            use serving::model_spec::VersionChoice;
            let spec = req
                .model_spec
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("model_spec is missing"))?;
            let name = crate::api::model_name(&spec.name).map_err(status)?;
            let statuses = self
                .state
                .registry
                .status(name)
                .ok_or_else(|| Status::not_found(format!("model '{name}' is not found")))?;
            let only = match &spec.version_choice {
                None => None,
                Some(VersionChoice::Version(v)) => Some(*v),
                Some(VersionChoice::VersionLabel(l)) => Some(
                    self.state
                        .registry
                        .label(name, l)
                        .map_err(not_found_or_precondition)? as i64,
                ),
            };
            let model_version_status: Vec<_> = statuses
                .iter()
                .filter(|s| only.is_none_or(|v| v == s.version as i64))
                .map(|s| serving::ModelVersionStatus {
                    version: s.version as i64,
                    state: match s.state {
                        crate::lifecycle::State::Start => S::Start,
                        crate::lifecycle::State::Loading => S::Loading,
                        crate::lifecycle::State::Available => S::Available,
                        crate::lifecycle::State::Unloading => S::Unloading,
                        crate::lifecycle::State::End => S::End,
                    } as i32,
                    status: Some(serving::StatusProto {
                        error_code: if s.error.is_some() {
                            tfpb::tensorflow::error::Code::Unknown
                        } else {
                            tfpb::tensorflow::error::Code::Ok
                        } as i32,
                        error_message: crate::api::error_for(admin, s).unwrap_or_default(),
                    }),
                })
                .collect();
            if model_version_status.is_empty() {
                return Err(Status::not_found(format!(
                    "version {} of model '{name}' is not found",
                    only.unwrap_or(0)
                )));
            }
            Ok(Response::new(serving::GetModelStatusResponse {
                model_version_status,
            }))
        })();
        super::count(&self.state, &result);
        result
    }

    async fn handle_reload_config_request(
        &self,
        _: Request<serving::ReloadConfigRequest>,
    ) -> Result<Response<serving::ReloadConfigResponse>, Status> {
        Err(Status::unimplemented(
            "HandleReloadConfigRequest is not served: nnserve serves what its repository holds; \
             upload, delete and label versions through the management API (docs/http-api.md)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn proto(dtype: DataType, shape: &[i64]) -> TensorProto {
        TensorProto {
            dtype: dtype as i32,
            tensor_shape: Some(shape_proto(shape)),
            ..Default::default()
        }
    }

    #[test]
    fn tensor_protos_become_host_tensors_as_tensorflow_reads_them() {
        let mut p = proto(DataType::DtFloat, &[2]);
        p.float_val = vec![1.5, -2.0];
        assert_eq!(
            tensor_from_proto("x", &p, 1 << 20).unwrap().to_f64_vec(),
            vec![1.5, -2.0]
        );
        // One value fills the shape.
        p.float_val = vec![3.0];
        assert_eq!(
            tensor_from_proto("x", &p, 1 << 20).unwrap().to_f64_vec(),
            vec![3.0, 3.0]
        );
        p.float_val = vec![1.0, 2.0, 3.0];
        let e = tensor_from_proto("x", &p, 1 << 20).unwrap_err();
        assert!(e.message().contains("needs 2"), "{}", e.message());
        // tensor_content wins, and must match the shape.
        p.tensor_content = Bytes::from(vec![0u8; 8]);
        assert_eq!(tensor_from_proto("x", &p, 1 << 20).unwrap().data.len(), 8);
        p.tensor_content = Bytes::from(vec![0u8; 7]);
        assert!(tensor_from_proto("x", &p, 1 << 20)
            .unwrap_err()
            .message()
            .contains("needs 8 bytes"));
        // Narrow integers travel in int_val, range-checked.
        let mut p = proto(DataType::DtInt8, &[1]);
        p.int_val = vec![300];
        assert!(tensor_from_proto("x", &p, 1 << 20)
            .unwrap_err()
            .message()
            .contains("out of range"));
        // One value may not fill more than the largest request.
        let mut p = proto(DataType::DtFloat, &[1 << 40]);
        p.float_val = vec![1.0];
        let e = tensor_from_proto("x", &p, 1 << 20).unwrap_err();
        assert!(
            e.message().contains("over the server's max_request_bytes"),
            "{}",
            e.message()
        );
        // DT_STRING is for handler plugins; an unknown rank is refused.
        let p = proto(DataType::DtString, &[1]);
        assert!(tensor_from_proto("x", &p, 1 << 20)
            .unwrap_err()
            .message()
            .contains("DT_STRING"));
        let mut p = proto(DataType::DtFloat, &[1]);
        p.tensor_shape.as_mut().unwrap().unknown_rank = true;
        assert!(tensor_from_proto("x", &p, 1 << 20)
            .unwrap_err()
            .message()
            .contains("unknown rank"));
    }

    #[test]
    fn host_tensors_answer_as_tensor_content() {
        let t = Tensor::from_f32(vec![1, 2], &[1.0, 2.0]);
        let p = tensor_to_proto(t.clone());
        assert_eq!(p.dtype, DataType::DtFloat as i32);
        assert_eq!(p.tensor_content.as_ref(), &t.data[..]);
        let back = tensor_from_proto("y", &p, 1 << 20).unwrap();
        assert_eq!((back.shape, back.data), (t.shape, t.data));
    }
}
