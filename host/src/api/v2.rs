//! KServe v2 / Open Inference Protocol (`/v2/...`), with Triton's binary tensor
//! extension both ways (`Inference-Header-Content-Length`, `binary_data_size`,
//! `binary_data` / `binary_data_output`), since `tritonclient[http]` uses it by default.

use super::codec::{self, write_flat_json};
use super::{infer_within, ApiError, AppState};
use crate::lifecycle::ModelVersion;
use crate::tensor::Tensor;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use nnserve_core::v2::{self, InferRequest};
use serde::Deserialize;
use serde_json::{json, Map, Value};

const HEADER_LENGTH: &str = "inference-header-content-length";

#[utoipa::path(get, path = "/v2", tag = "server",
    responses((status = 200, description = "The server's name, version and protocol extensions", body = super::openapi::ServerMetadata)))]
pub async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "nnserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

#[utoipa::path(get, path = "/v2/health/live", tag = "server",
    responses((status = 200, description = "The process serves HTTP", body = super::openapi::Live)))]
pub async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

/// Live from the moment the listener opens, before any model has loaded.
/// Ready by the rule of `api::probe`: 200 when ready, 503 while loading, when the rule
/// does not hold, and while draining (load balancers then stop sending).
#[utoipa::path(get, path = "/v2/health/ready", tag = "server",
    responses(
        (status = 200, description = "Ready: the start-up versions have loaded", body = super::openapi::Ready),
        (status = 503, description = "Loading, or draining after SIGTERM", body = super::openapi::Ready),
    ))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.probe.is_ready(&state.registry) {
        return axum::Json(json!({ "ready": true })).into_response();
    }
    let why = if state.probe.draining() {
        "draining: the server is shutting down"
    } else {
        "loading: the start-up versions have not all loaded (docs/kubernetes.md, Probes)"
    };
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "ready": false, "reason": why })),
    )
        .into_response()
}

use super::{model_name, version_param as parse_version};

fn metadata(state: &AppState, model: &str, version: Option<u64>) -> Result<Response, ApiError> {
    let s = super::resolve_model(state, model, version, None)?;
    let spec = s.model_spec();
    let list = |l: &[crate::bundle::TensorSpec]| -> Vec<Value> {
        l.iter()
            .map(|t| json!({ "name": t.name, "datatype": t.dtype.v2_name(), "shape": t.shape }))
            .collect()
    };
    let versions = available_versions(state, s.name());
    Ok(axum::Json(json!({
        "name": s.name(),
        "versions": versions,
        "platform": model_platform(spec),
        "inputs": list(&spec.inputs),
        "outputs": list(&spec.outputs),
    }))
    .into_response())
}

/// The available versions of a model, newest first, as text (v2 metadata).
pub(crate) fn available_versions(state: &AppState, name: &str) -> Vec<String> {
    state
        .registry
        .status(name)
        .unwrap_or_default()
        .iter()
        .filter(|v| v.state == crate::lifecycle::State::Available)
        .map(|v| v.version.to_string())
        .rev()
        .collect()
}

/// Triton's platform name of a model.
pub(crate) fn model_platform(spec: &crate::bundle::ModelSpec) -> &'static str {
    match spec.backend {
        crate::bundle::BackendKind::Torchscript => "pytorch_libtorch",
        crate::bundle::BackendKind::Tensorflow => "tensorflow_savedmodel",
        crate::bundle::BackendKind::None => "nnserve_plugin",
    }
}

/// `/v2/models/{model}[/versions/{version}]...`: both shapes of a v2 model route, so
/// that each v2 verb has one handler for both.
#[derive(Deserialize)]
pub struct ModelPath {
    model: String,
    #[serde(default)]
    version: Option<String>,
}

impl ModelPath {
    /// The model name and version, each checked.
    fn parse(&self) -> Result<(&str, Option<u64>), ApiError> {
        let model = model_name(&self.model)?;
        let version = self.version.as_deref().map(parse_version).transpose()?;
        Ok((model, version))
    }
}

#[utoipa::path(get, path = "/v2/models/{model}", tag = "kserve-v2",
    responses(
        (status = 200, description = "The model's signature and available versions", body = super::openapi::V2ModelMetadata),
        (status = 404, description = "No such model or version"),
        (status = 503, description = "The version is not available (loading or failed)"),
    ))]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Response, ApiError> {
    let (model, version) = p.parse()?;
    metadata(&state, model, version)
}

fn model_ready_impl(
    state: &AppState,
    model: &str,
    version: Option<u64>,
) -> Result<Response, ApiError> {
    match super::resolve_model(state, model, version, None) {
        Ok(_) => Ok(axum::Json(json!({ "name": model, "ready": true })).into_response()),
        Err(ApiError::Unavailable(e)) => Ok((
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "name": model, "ready": false, "error": e })),
        )
            .into_response()),
        Err(e) => Err(e),
    }
}

#[utoipa::path(get, path = "/v2/models/{model}/ready", tag = "kserve-v2",
    responses(
        (status = 200, description = "Ready", body = super::openapi::ModelReady),
        (status = 400, description = "Known but not available, or a name that breaks the rule", body = super::openapi::ModelNotReady),
        (status = 404, description = "No such model or version"),
    ))]
pub async fn model_ready(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Response, ApiError> {
    let (model, version) = p.parse()?;
    model_ready_impl(&state, model, version)
}

#[utoipa::path(post, path = "/v2/models/{model}/infer", tag = "kserve-v2",
    params(
        ("x-nnserve-timeout-ms" = Option<u64>, Header, description = "Lowers this request's deadline, in milliseconds (docs/http-api.md, Deadlines)"),
        ("inference-header-content-length" = Option<u64>, Header, description = "With binary tensors: the length of the JSON head before them (Triton's binary extension)"),
    ),
    request_body(description = "The JSON request, or its JSON head followed by binary tensors", content(
        (nnserve_core::v2::InferRequest = "application/json"),
        (Vec<u8> = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "The outputs; binary outputs follow the JSON head (`inference-header-content-length`)", content(
            (super::openapi::V2InferResponse = "application/json"),
            (Vec<u8> = "application/octet-stream"),
        )),
        (status = 400, description = "The body or its tensors do not fit the model's signature"),
        (status = 404, description = "No such model, version or label"),
        (status = 429, description = "The model's queue is full; retry after `Retry-After`"),
        (status = 503, description = "No version of the model is available (loading, unloaded or failed), or the server is draining"),
        (status = 504, description = "The request's deadline ran out"),
        (status = 500, description = "The model's forward failed, or its handler plugin trapped (the message says which)"),
    ))]
pub async fn infer(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let (model, version) = p.parse()?;
    let body = super::read_body(&state, &headers, body).await?;
    let path = match version {
        Some(v) => format!("/v2/models/{model}/versions/{v}/infer"),
        None => format!("/v2/models/{model}/infer"),
    };
    super::serve_inference(
        &state,
        model,
        version,
        None,
        super::Verb::V2Infer,
        axum::http::Method::POST,
        &path,
        headers,
        body,
    )
    .await
}

/// Warm-up entry point (see `api::warmup_hook`).
pub(super) async fn warm_infer(
    state: &AppState,
    s: &ModelVersion,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    infer_resolved(state, s, headers, body).await
}

pub(super) async fn infer_resolved(
    state: &AppState,
    s: &ModelVersion,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let (json_part, tail) = match headers.get(HEADER_LENGTH) {
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Inference-Header-Content-Length is not a number".into())
                })?;
            codec::split_binary(body, n).map_err(ApiError::BadRequest)?
        }
        None => (body, &[][..]),
    };
    let parsing = state.json_gate.enter(json_part.len()).await;
    let mut req = v2::parse_request(json_part).map_err(ApiError::BadRequest)?;
    let datatypes = req.inputs.iter().map(|i| i.datatype.as_str());
    if super::body_call::is_body_call(s, datatypes) {
        drop(parsing);
        return body_call(state, s, headers, &req, tail).await;
    }

    let inputs = v2::decode_inputs(&req, tail).map_err(ApiError::BadRequest)?;
    // The JSON values of the inputs are gone once decoded; the tensors are compact.
    req.inputs = Vec::new();
    drop(parsing);

    // Requested outputs: each once (a name asked for 10,000 times made a 370 MB answer
    // of a 244 KB request), and only the model's (checked before the forward).
    let mut seen = std::collections::HashSet::new();
    req.outputs.retain(|o| seen.insert(o.name.clone()));
    let declared = &s.model_spec().outputs;
    if let Some(o) = req
        .outputs
        .iter()
        .find(|o| !declared.is_empty() && !declared.iter().any(|d| d.name == o.name))
    {
        return Err(ApiError::BadRequest(format!(
            "requested output {} does not exist; the model's outputs are {:?}",
            crate::names::shown(&o.name),
            declared.iter().map(|d| &d.name).collect::<Vec<_>>()
        )));
    }

    let outputs = infer_within(state, headers, s.runner(), inputs).await?;

    // Which outputs, and which of them as binary.
    let default_binary = req
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let selected: Vec<(&String, &Tensor, bool)> = if req.outputs.is_empty() {
        outputs
            .iter()
            .map(|(n, t)| (n, t, default_binary))
            .collect()
    } else {
        req.outputs
            .iter()
            .map(|o| {
                let (n, t) = outputs.iter().find(|(n, _)| *n == o.name).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "requested output {} does not exist; the model's outputs are {:?}",
                        crate::names::shown(&o.name),
                        outputs.iter().map(|(n, _)| n).collect::<Vec<_>>()
                    ))
                })?;
                let binary = o
                    .parameters
                    .get("binary_data")
                    .and_then(Value::as_bool)
                    .unwrap_or(default_binary);
                Ok((n, t, binary))
            })
            .collect::<Result<_, ApiError>>()?
    };

    super::check_answer_size(
        state,
        selected.iter().map(|(n, t, binary)| {
            let data = if *binary {
                t.data.len() as u64
            } else {
                codec::json_bound(t)
            };
            data + n.len() as u64 * 6 + 128
        }),
    )?;
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"model_name\":");
    out.extend_from_slice(serde_json::to_string(s.name()).unwrap().as_bytes());
    out.extend_from_slice(format!(",\"model_version\":\"{}\"", s.version()).as_bytes());
    if let Some(id) = &req.id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(serde_json::to_string(id).unwrap().as_bytes());
    }
    out.extend_from_slice(b",\"outputs\":[");
    let mut any_binary = false;
    for (i, (name, t, binary)) in selected.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        out.extend_from_slice(serde_json::to_string(name).unwrap().as_bytes());
        out.extend_from_slice(
            format!(
                ",\"datatype\":\"{}\",\"shape\":{}",
                t.dtype.v2_name(),
                json!(t.shape)
            )
            .as_bytes(),
        );
        if *binary {
            any_binary = true;
            out.extend_from_slice(
                format!(
                    ",\"parameters\":{{\"binary_data_size\":{}}}}}",
                    t.data.len()
                )
                .as_bytes(),
            );
        } else {
            out.extend_from_slice(b",\"data\":");
            write_flat_json(&mut out, t);
            out.push(b'}');
        }
    }
    out.extend_from_slice(b"]}");
    if !any_binary {
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            out,
        )
            .into_response());
    }
    let header_len = out.len();
    for (_, t, binary) in &selected {
        if *binary {
            out.extend_from_slice(&t.data);
        }
    }
    Ok(binary_answer(out, header_len))
}

/// An answer of Triton's binary extension: `out` is the JSON head (`header_len` bytes)
/// and the binary outputs after it.
fn binary_answer(out: Vec<u8>, header_len: usize) -> Response {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (
                axum::http::HeaderName::from_static(HEADER_LENGTH),
                header_len.to_string(),
            ),
        ],
        out,
    )
        .into_response()
}

/// A handler plugin's bundle called through v2 `infer` with one BYTES input: its one
/// element (a JSON string in `data`, or binary, length-prefixed) is the request body;
/// the answer is the BYTES output `body`, as a JSON string when it is UTF-8 text and
/// binary was not asked for, else as binary data (module `body_call`).
async fn body_call(
    state: &AppState,
    s: &ModelVersion,
    headers: &HeaderMap,
    req: &InferRequest,
    mut tail: &[u8],
) -> Result<Response, ApiError> {
    use super::body_call::{bytes_element, one_element, split_bytes_elements, BODY_OUTPUT};
    let input = &req.inputs[0];
    let name = crate::names::bounded(&input.name);
    let body = match (input.parameters.get("binary_data_size"), &input.data) {
        (Some(size), None) => {
            let size = size.as_u64().ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "input '{name}': binary_data_size must be a non-negative integer"
                ))
            })? as usize;
            let raw = codec::take_binary(&mut tail, size, &name).map_err(ApiError::BadRequest)?;
            let elements = split_bytes_elements(raw)
                .map_err(|e| ApiError::BadRequest(format!("input '{name}': {e}")))?;
            bytes::Bytes::copy_from_slice(one_element(&input.name, elements)?)
        }
        (None, Some(data)) => {
            let mut strings = Vec::new();
            flatten_strings(data, &mut strings).map_err(|what| {
                ApiError::BadRequest(format!(
                    "input '{name}' is BYTES: its data must be strings, not {what} (or send it binary)"
                ))
            })?;
            bytes::Bytes::from(one_element(&input.name, strings)?.into_bytes())
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(format!(
                "input '{name}' has both \"data\" and a binary_data_size parameter; send one"
            )))
        }
        (None, None) => {
            return Err(ApiError::BadRequest(format!(
                "input '{name}' has neither \"data\" nor a binary_data_size parameter"
            )))
        }
    };
    if !tail.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{} bytes of binary data are left over after the inputs' binary_data_size",
            tail.len()
        )));
    }
    let content_type = [&input.parameters, &req.parameters]
        .into_iter()
        .find_map(|p| p.get("content_type").and_then(Value::as_str));
    let mut headers = headers.clone();
    headers.remove(HEADER_LENGTH);
    let answer = super::body_call::call_handler(state, s, &headers, body, content_type).await?;
    let asked_binary = req
        .outputs
        .iter()
        .find(|o| o.name == BODY_OUTPUT)
        .and_then(|o| o.parameters.get("binary_data").and_then(Value::as_bool))
        .or_else(|| {
            req.parameters
                .get("binary_data_output")
                .and_then(Value::as_bool)
        })
        .unwrap_or(false);
    let text = std::str::from_utf8(&answer.body)
        .ok()
        .filter(|_| !asked_binary);
    let mut parameters = Map::new();
    if let Some(ct) = &answer.content_type {
        parameters.insert("content_type".into(), json!(ct));
    }
    let raw = match text {
        Some(_) => None,
        None => {
            let raw = bytes_element(&answer.body);
            parameters.insert("binary_data_size".into(), json!(raw.len()));
            Some(raw)
        }
    };
    let mut output = json!({
        "name": BODY_OUTPUT, "datatype": super::body_call::BYTES, "shape": [1], "parameters": parameters,
    });
    if let Some(t) = text {
        output["data"] = json!([t]);
    }
    let mut answer_json = json!({
        "model_name": s.name(),
        "model_version": s.version().to_string(),
        "outputs": [output],
    });
    if let Some(id) = &req.id {
        answer_json["id"] = id.clone();
    }
    let mut out = serde_json::to_vec(&answer_json).expect("a JSON value serializes");
    let Some(raw) = raw else {
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            out,
        )
            .into_response());
    };
    let header_len = out.len();
    out.extend_from_slice(&raw);
    Ok(binary_answer(out, header_len))
}

/// The strings of a (nested) JSON array, row-major; the kind of the first value that
/// is not one.
fn flatten_strings(v: &Value, out: &mut Vec<String>) -> Result<(), &'static str> {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => {
            for i in items {
                flatten_strings(i, out)?;
            }
        }
        Value::Number(_) => return Err("numbers"),
        Value::Bool(_) => return Err("booleans"),
        Value::Null => return Err("null"),
        Value::Object(_) => return Err("objects"),
    }
    Ok(())
}

/// Triton's repository extension: `POST /v2/repository/index`, every model version
/// with `READY` or `UNAVAILABLE` (and why).
#[utoipa::path(post, path = "/v2/repository/index", tag = "management",
    security(("admin_token" = [])),
    responses((status = 200, description = "Every model version, READY or UNAVAILABLE and why", body = Vec<super::openapi::RepositoryIndexEntry>)))]
pub async fn repository_index(
    State(state): State<AppState>,
    admin: super::Admin,
) -> Result<Response, ApiError> {
    let out: Vec<Value> = repository_entries(&state, admin.full_errors, false)
        .into_iter()
        .map(
            |e| json!({"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}),
        )
        .collect();
    Ok(axum::Json(out).into_response())
}

/// One model version in Triton's repository index.
pub(crate) struct IndexEntry {
    pub name: String,
    pub version: String,
    /// `READY` or `UNAVAILABLE`.
    pub state: &'static str,
    pub reason: String,
}

/// Every model version with `READY` or `UNAVAILABLE` (and why, as this caller may see
/// it); only the ready ones with `ready_only`.
pub(crate) fn repository_entries(
    state: &AppState,
    admin: bool,
    ready_only: bool,
) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    for (name, versions, _) in state.registry.list() {
        for v in versions {
            let ready = v.state == crate::lifecycle::State::Available;
            if ready_only && !ready {
                continue;
            }
            out.push(IndexEntry {
                name: name.clone(),
                version: v.version.to_string(),
                state: if ready { "READY" } else { "UNAVAILABLE" },
                reason: super::error_for(admin, &v).unwrap_or_else(|| {
                    if ready {
                        String::new()
                    } else {
                        v.state.as_str().to_string()
                    }
                }),
            });
        }
    }
    out
}

/// `POST /v2/repository/models/{m}/load`.
#[utoipa::path(post, path = "/v2/repository/models/{model}/load", tag = "management",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Loaded what the model's version policy wants", body = super::openapi::Empty),
        (status = 400, description = "Nothing loaded: the reasons"),
        (status = 404, description = "The repository has no such model"),
    ))]
pub async fn repository_load(
    State(state): State<AppState>,
    Path(model): Path<String>,
    admin: super::Admin,
) -> Result<Response, ApiError> {
    model_name(&model)?;
    state.manager.load_model(&model, admin.full_errors).await?;
    Ok(axum::Json(json!({})).into_response())
}

/// `POST /v2/repository/models/{m}/unload`.
#[utoipa::path(post, path = "/v2/repository/models/{model}/unload", tag = "management",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every loaded version is out of service; requests in flight finish", body = super::openapi::Empty),
        (status = 404, description = "No such model"),
    ))]
pub async fn repository_unload(
    State(state): State<AppState>,
    Path(model): Path<String>,
    _admin: super::Admin,
) -> Result<Response, ApiError> {
    model_name(&model)?;
    state.manager.unload_model(&model).await?;
    Ok(axum::Json(json!({})).into_response())
}
