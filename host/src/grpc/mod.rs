//! gRPC: KServe v2 as Triton serves it (`inference.GRPCInferenceService`, from
//! `proto/inference.proto`), the standard health service and reflection, over the same models,
//! endpoints, batching, lifecycle and metrics as the HTTP API; on its own listener
//! (`--grpc-listen`), with TensorFlow Serving's `PredictionService` and `ModelService`
//! beside it (`tfserving`). Its rooms: the service here (every RPC, the mapping of
//! errors to status codes, the call's metadata as headers), `infer` (ModelInfer's tensors
//! and the BYTES call of a handler plugin), `models` (metadata, configuration,
//! statistics), `tfserving`, `health`, `bound` (the layer around every call), and
//! `listener` (the connections).
//!
//! It calls the `api` room's request path (resolve, route, run, count), so a request
//! over gRPC is served and counted exactly as one over HTTP; `api` knows nothing of it.

mod bound;
mod health;
mod infer;
mod listener;
mod models;
mod tfserving;

pub use listener::serve;

use crate::api::{ApiError, AppState};
use axum::http::{HeaderMap, HeaderValue};
use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The messages of `proto/inference.proto` (nnserve-core's) and the server trait
/// generated over them (build.rs).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub use nnserve_core::grpc::inference::*;
    tonic::include_proto!("inference");
}

/// The encoded descriptors of `proto/inference.proto` (build.rs), for reflection.
const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// The gRPC routes: the inference service with the server's message size limits, health,
/// and server reflection (v1) of both.
pub fn routes(state: AppState) -> tonic::service::Routes {
    let inference = GrpcInferenceServiceServer::new(Service {
        state: state.clone(),
    })
    .max_decoding_message_size(state.max_request_bytes)
    .max_encoding_message_size(state.max_response_bytes);
    let health = tonic_health::pb::health_server::HealthServer::new(health::HealthService {
        state: state.clone(),
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor sets compiled into the binary are valid");
    let tf = || tfserving::TfServing {
        state: state.clone(),
    };
    let prediction = tfserving::tfpb::tensorflow::serving::prediction_service_server::PredictionServiceServer::new(tf())
        .max_decoding_message_size(state.max_request_bytes)
        .max_encoding_message_size(state.max_response_bytes);
    let model_service =
        tfserving::tfpb::tensorflow::serving::model_service_server::ModelServiceServer::new(tf());
    let routes = tonic::service::Routes::new(inference)
        .add_service(prediction)
        .add_service(model_service)
        .add_service(health)
        .add_service(reflection);
    // `x-request-id` as over HTTP: kept or made, echoed as metadata, in the call's logs.
    routes
        .into_axum_router()
        .layer(axum::middleware::from_fn(crate::api::request_id::layer))
        .into()
}

/// The layer around every call: its whole time bounded by `request_timeout` plus
/// `body_read_timeout` (see `listener`), an oversized message answered as Triton does.
pub fn bound(state: &AppState, limits: &crate::connections::Limits) -> bound::BoundLayer {
    bound::BoundLayer {
        bound: state.request_timeout + limits.body_read_timeout,
        max_request: state.max_request_bytes,
        metrics: state.metrics.clone(),
    }
}

/// The status code of an error, as Triton maps them; the message is the HTTP API's.
pub(crate) fn status(e: ApiError) -> Status {
    use tonic::Code;
    let code = match &e {
        ApiError::BadRequest(_) | ApiError::UnsupportedMediaType(_) => Code::InvalidArgument,
        ApiError::NotFound(_) => Code::NotFound,
        ApiError::Internal(_) => Code::Internal,
        ApiError::Unauthorized(_) => Code::Unauthenticated,
        ApiError::Conflict(_) => Code::FailedPrecondition,
        ApiError::TooLarge(_) => Code::ResourceExhausted,
        ApiError::SlowClient(_) | ApiError::Timeout(_) => Code::DeadlineExceeded,
        ApiError::TooManyRequests(_) | ApiError::Unavailable(_) => Code::Unavailable,
    };
    if code == Code::Internal {
        tracing::warn!("gRPC: {}", e.message());
    }
    Status::new(code, e.message())
}

/// Counts a finished call in `nnserve_api_requests_total{protocol="grpc"}`.
pub(crate) fn count<T>(state: &AppState, result: &Result<T, Status>) {
    use tonic::Code;
    let outcome = match result {
        Ok(_) => "ok",
        Err(s) => match s.code() {
            Code::Unavailable => "overload",
            Code::DeadlineExceeded => "timeout",
            Code::Internal | Code::Unknown | Code::DataLoss => "server_error",
            _ => "client_error",
        },
    };
    state.metrics.api_request("grpc", outcome);
}

/// A version from a request: empty means the server's choice.
fn version_of(text: &str) -> Result<Option<u64>, ApiError> {
    if text.is_empty() {
        Ok(None)
    } else {
        crate::api::version_param(text).map(Some)
    }
}

/// The call's metadata as HTTP headers, for the deadline, routers and plugins; a
/// `grpc-timeout` becomes the deadline header (`x-nnserve-timeout-ms`), the lower one
/// winning when both are sent.
pub(crate) fn call_headers(metadata: tonic::metadata::MetadataMap) -> Result<HeaderMap, Status> {
    let mut headers = metadata.into_headers();
    if let Some(t) = headers.remove("grpc-timeout") {
        let ms = parse_grpc_timeout(t.as_bytes()).ok_or_else(|| {
            Status::invalid_argument(
                "grpc-timeout is not a timeout (1 to 8 digits and a unit of H, M, S, m, u, n)",
            )
        })?;
        let ms = ms.as_millis().clamp(1, u64::MAX as u128) as u64;
        let lower = headers
            .get(crate::api::TIMEOUT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(ms, |given| given.min(ms));
        headers.insert(crate::api::TIMEOUT_HEADER, HeaderValue::from(lower));
    }
    Ok(headers)
}

/// `grpc-timeout`: up to 8 digits and a unit (gRPC over HTTP/2, "Timeout").
fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The inference service.
struct Service {
    state: AppState,
}

impl Service {
    /// Counts the call and maps its error.
    fn done<T>(&self, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
        let result = result.map(Response::new).map_err(status);
        count(&self.state, &result);
        result
    }

    /// The management check of the HTTP API, on the call's metadata
    /// (`authorization: Bearer <token>`).
    fn admin<T>(&self, request: &Request<T>) -> Result<crate::api::Admin, Status> {
        if self.state.management == crate::config::Management::Off {
            let s = Status::unimplemented(
                "the management API is off on this server (--management off)",
            );
            count::<()>(&self.state, &Err(s.clone()));
            return Err(s);
        }
        let headers = request.metadata().clone().into_headers();
        crate::api::Admin::check(&self.state, &headers).map_err(|e| {
            let s = status(e);
            count::<()>(&self.state, &Err(s.clone()));
            s
        })
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        self.done(Ok(pb::ServerLiveResponse { live: true }))
    }

    /// As `/v2/health/ready` (`api::probe`): false while loading and while draining.
    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.state.probe.is_ready(&self.state.registry);
        self.done(Ok(pb::ServerReadyResponse { ready }))
    }

    /// Ready while the version (the newest when none is named) is available; false also
    /// for a name the server does not have, as Triton answers.
    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.get_ref();
        let result = models::target(&self.state, &r.name, &r.version);
        let result = match result {
            Ok(_) => Ok(true),
            Err(ApiError::Unavailable(_) | ApiError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        };
        self.done(result.map(|ready| pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let mut extensions = vec!["model_configuration".to_string(), "statistics".to_string()];
        if self.state.management != crate::config::Management::Off {
            extensions.push("model_repository".to_string());
        }
        self.done(Ok(pb::ServerMetadataResponse {
            name: "nnserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.get_ref();
        let result = models::target(&self.state, &r.name, &r.version).map(|s| {
            let versions = crate::api::available_versions(&self.state, s.name());
            models::metadata(&s, versions)
        });
        self.done(result)
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let headers = match call_headers(metadata) {
            Ok(h) => h,
            Err(s) => {
                count::<()>(&self.state, &Err(s.clone()));
                return Err(s);
            }
        };
        let call = async {
            let name = crate::api::model_name(&req.model_name)?.to_string();
            let version = version_of(&req.model_version)?;
            let call = infer::GrpcInfer {
                req: Arc::new(req),
                headers: Arc::new(headers),
            };
            crate::api::serve(&self.state, &name, version, None, call).await
        };
        let (result, target) = match call.await {
            Ok(served) => served,
            Err(e) => return self.done(Err(e)),
        };
        // The version that answered, as HTTP's `x-nnserve-variant`, also on an error.
        let variant = tonic::metadata::MetadataValue::try_from(target.id.clone()).ok();
        let mut result = self.done(result);
        match (&mut result, variant) {
            (Ok(resp), Some(v)) => {
                resp.metadata_mut().insert(crate::api::VARIANT_HEADER, v);
            }
            (Err(s), Some(v)) => {
                s.metadata_mut().insert(crate::api::VARIANT_HEADER, v);
            }
            _ => {}
        }
        result
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.get_ref();
        let result =
            models::target(&self.state, &r.name, &r.version).map(|s| pb::ModelConfigResponse {
                config: Some(models::config(&s)),
            });
        self.done(result)
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = request.get_ref();
        let result =
            version_of(&r.version).and_then(|v| models::all_statistics(&self.state, &r.name, v));
        self.done(result)
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let admin = self.admin(&request)?;
        use pb::repository_index_response::ModelIndex;
        let models =
            crate::api::repository_entries(&self.state, admin.full_errors, request.get_ref().ready)
                .into_iter()
                .map(|e| ModelIndex {
                    name: e.name,
                    version: e.version,
                    state: e.state.to_string(),
                    reason: e.reason,
                })
                .collect();
        self.done(Ok(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let admin = self.admin(&request)?;
        let r = request.into_inner();
        let result = async {
            let name = crate::api::model_name(&r.model_name)?;
            self.state
                .manager
                .load_model(name, admin.full_errors)
                .await?;
            Ok(pb::RepositoryModelLoadResponse {})
        };
        self.done(result.await)
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.admin(&request)?;
        let r = request.into_inner();
        let result = async {
            let name = crate::api::model_name(&r.model_name)?;
            self.state.manager.unload_model(name).await?;
            Ok(pb::RepositoryModelUnloadResponse {})
        };
        self.done(result.await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_writes_them() {
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5000u"), Some(Duration::from_millis(5)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
        assert_eq!(parse_grpc_timeout(b""), None);
    }

    #[test]
    fn a_grpc_timeout_lowers_the_deadline_header() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-timeout", "1500m".parse().unwrap());
        let h = call_headers(md.clone()).unwrap();
        assert_eq!(h.get(crate::api::TIMEOUT_HEADER).unwrap(), "1500");
        md.insert(crate::api::TIMEOUT_HEADER, "20".parse().unwrap());
        let h = call_headers(md.clone()).unwrap();
        assert_eq!(h.get(crate::api::TIMEOUT_HEADER).unwrap(), "20");
        md.insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(
            call_headers(md.clone()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
