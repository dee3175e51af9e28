//! TF Serving REST (`/v1/models/...`): status, metadata, `:predict`, and the plugin
//! endpoint `:infer`. TF Serving puts the verb after a colon in the last segment, which
//! a router cannot match, so the path is parsed here.

use super::codec;
use super::{infer_within, ApiError, AppState, Verb};
use crate::lifecycle::ModelVersion;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use std::sync::Arc;

use nnserve_core::target::{RouteError, Target};
use nnserve_core::tfserving::{rows_of, write_outputs, write_predictions};

/// The `/v1/models/{rest}` path parsed (nnserve-core's `target`), its error an API error.
fn parse_target(rest: &str) -> Result<Target, ApiError> {
    nnserve_core::target::parse_target(rest).map_err(|e| match e {
        RouteError::BadRequest(m) => ApiError::BadRequest(m),
        RouteError::NotFound(m) => ApiError::NotFound(m),
    })
}

/// The methods a `/v1/models/{rest}` resource takes, as `Allow` lists them: one
/// catch-all route serves them all, so a method its path does not take is answered here
/// (405 with the right `Allow`), not by the router, which would list every method of
/// the catch-all. `None` for a path that is no resource (the handler's 400 or 404).
fn allowed(rest: &str, managed: bool) -> Option<&'static str> {
    if rest
        .strip_suffix("/versions")
        .is_some_and(|m| !m.contains('/'))
    {
        return Some("POST");
    }
    let t = nnserve_core::target::parse_target(rest).ok()?;
    Some(match (&t.verb, t.metadata, t.version, &t.label) {
        (Some(_), ..) => "POST",
        (None, false, Some(_), None) if managed => "GET, HEAD, DELETE",
        (None, false, None, Some(_)) if managed => "GET, HEAD, PUT",
        _ => "GET, HEAD",
    })
}

/// `Err(405)` when `rest` is a resource that does not take `method`.
fn check_method(state: &AppState, rest: &str, method: &Method) -> Result<(), Response> {
    let managed = state.management != crate::config::Management::Off;
    let Some(allow) = allowed(rest, managed) else {
        return Ok(());
    };
    let name = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    if allow.split(", ").any(|m| m == name) {
        return Ok(());
    }
    let error = super::openapi::ErrorBody {
        error: format!(
            "{method} /v1/models/{} is not served: this resource takes {allow} (docs/http-api.md)",
            crate::names::bounded(rest)
        ),
    };
    Err((
        StatusCode::METHOD_NOT_ALLOWED,
        [(axum::http::header::ALLOW, allow)],
        axum::Json(error),
    )
        .into_response())
}

/// Methods the catch-all has no handler for (OPTIONS, PATCH; PUT and DELETE under
/// `management = off`): 405 with the resource's own `Allow`; for no resource, 400 when
/// a name in it breaks the rule, else 404.
pub async fn other_method(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    method: Method,
) -> Result<Response, ApiError> {
    if let Err(wrong) = check_method(&state, &rest, &method) {
        return Ok(wrong);
    }
    // No resource: why not (a name that breaks the rule is a 400), else a 404.
    parse_target(&rest)?;
    Err(ApiError::NotFound(format!(
        "no route for {method} /v1/models/{}; see docs/http-api.md for the routes",
        crate::names::bounded(&rest)
    )))
}

fn resolve(state: &AppState, t: &Target) -> Result<Arc<ModelVersion>, ApiError> {
    super::resolve_model(state, &t.model, t.version, t.label.as_deref())
}

/// `GET /v1/models/{m}[/versions/{v}]` (status) and `.../metadata`.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "tfserving",
    responses(
        (status = 200, description = "The state of each version (TF Serving's GetModelStatus)", body = super::openapi::ModelStatus),
        (status = 404, description = "No such model, version or label"),
    ))]
pub async fn get_model(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Err(wrong) = check_method(&state, &rest, &method) {
        return Ok(wrong);
    }
    let admin = super::is_admin(&state, &headers);
    let t = parse_target(&rest)?;
    if t.metadata {
        let s = resolve(&state, &t)?;
        return Ok(axum::Json(tf_metadata(&s)).into_response());
    }
    let statuses = state
        .registry
        .status(&t.model)
        .ok_or_else(|| ApiError::NotFound(format!("model '{}' is not found", t.model)))?;
    // `/labels/{l}`: the version the label points at (TF Serving's GetModelStatus).
    let version = match &t.label {
        Some(l) => Some(state.registry.label(&t.model, l)?),
        None => t.version,
    };
    let list: Vec<Value> = statuses
        .iter()
        .filter(|s| version.is_none_or(|v| v == s.version))
        .map(|s| {
            json!({
                "version": s.version.to_string(),
                "state": s.state.as_str(),
                "status": {
                    "error_code": if s.error.is_some() { "UNKNOWN" } else { "OK" },
                    "error_message": super::error_for(admin, s).unwrap_or_default(),
                }
            })
        })
        .collect();
    if list.is_empty() {
        return Err(ApiError::NotFound(format!(
            "version {} of model '{}' is not found",
            version.unwrap_or(0),
            t.model
        )));
    }
    Ok(axum::Json(json!({ "model_version_status": list })).into_response())
}

#[utoipa::path(get, path = "/v1/models/{model}/metadata", tag = "tfserving",
    responses(
        (status = 200, description = "The signature (TF Serving's GetModelMetadata)", body = super::openapi::TfModelMetadata),
        (status = 404, description = "No such model, version or label"),
        (status = 503, description = "The version is not available (loading or failed)"),
    ))]
pub(super) fn tf_metadata(s: &ModelVersion) -> Value {
    let spec = s.model_spec();
    let sig = |list: &[crate::bundle::TensorSpec]| -> Value {
        let mut m = Map::new();
        for t in list {
            let dims: Vec<Value> = t
                .shape
                .iter()
                .map(|d| json!({ "size": d.to_string(), "name": "" }))
                .collect();
            m.insert(
                t.name.clone(),
                json!({ "dtype": t.dtype.tf_name(), "tensor_shape": { "dim": dims, "unknown_rank": false }, "name": t.name }),
            );
        }
        Value::Object(m)
    };
    json!({
        "model_spec": { "name": s.name(), "signature_name": "", "version": s.version().to_string() },
        "metadata": { "signature_def": { "signature_def": { "serving_default": {
            "inputs": sig(&spec.inputs),
            "outputs": sig(&spec.outputs),
            "method_name": "tensorflow/serving/predict",
        }}}}
    })
}

/// `POST /v1/models/{m}[/versions/{v}]:predict|:infer`.
pub async fn post_model(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    if let Err(wrong) = check_method(&state, &rest, &method) {
        return Ok(wrong);
    }
    if let Some(model) = rest.strip_suffix("/versions").filter(|m| !m.contains('/')) {
        return upload(&state, super::model_name(model)?, &headers, body).await;
    }
    let body = super::read_body(&state, &headers, body).await?;
    let t = parse_target(&rest)?;
    let verb = t.verb.as_deref();
    if matches!(verb, Some("predict") | Some("infer")) {
        let verb = if verb == Some("predict") {
            Verb::Predict
        } else {
            Verb::Infer { rest: rest.clone() }
        };
        let path = format!("/v1/models/{rest}");
        return super::serve_inference(
            &state,
            &t.model,
            t.version,
            t.label.as_deref(),
            verb,
            method,
            &path,
            headers,
            body,
        )
        .await;
    }
    match verb {
        Some(other) => Err(ApiError::NotFound(format!(
            "unknown verb ':{}'; nnserve serves :predict (tensors as JSON) and :infer (the bundle's handler plugin)",
            crate::names::bounded(other)
        ))),
        None => Err(ApiError::NotFound(format!(
            "POST /v1/models/{} needs a verb: :predict or :infer",
            crate::names::bounded(&rest)
        ))),
    }
}

/// `GET /v1/models`: every model, its versions with state, error and digest, and labels.
#[utoipa::path(get, path = "/v1/models", tag = "management",
    responses((status = 200, description = "Every model with its versions, states, digests and labels; the admin sees full errors", body = super::openapi::ModelList)))]
pub async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let admin = super::is_admin(&state, &headers);
    let source = &state.manager.source;
    let models: Vec<Value> = state
        .registry
        .list()
        .into_iter()
        .map(|(name, versions, labels)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|s| {
                    let meta = source.meta(&name, s.version);
                    let mut v = json!({
                        "version": s.version.to_string(),
                        "state": s.state.as_str(),
                        "error": super::error_for(admin, s),
                        "digest": meta.as_ref().map(|m| m.digest.clone()),
                        "uploaded_at": meta.as_ref().map(|m| m.uploaded_at),
                    });
                    // How a loaded model runs, as the server chose it at load.
                    let servable = state.registry.resolve(&name, Some(s.version)).ok();
                    if let Some(runner) = servable
                        .as_ref()
                        .and_then(|x| x.as_model())
                        .map(|m| &m.runner)
                    {
                        let t = runner.threading();
                        v["execution"] = json!({
                            "device": runner.device(),
                            "batching": runner.batches(),
                            "forwards_at_once": t.concurrency,
                            "intra_op_threads": t.intra_op.to_json(),
                        });
                    }
                    v
                })
                .collect();
            json!({ "name": name, "versions": versions, "labels": labels })
        })
        .collect();
    let mut answer = json!({ "models": models });
    if let Some(o) = &state.manager.objects {
        // The object store's health: a replica that cannot reach it serves its cache.
        let last_error = o.health.last_error.lock().unwrap().clone();
        answer["repository"] = json!({
            // The bucket's name is the operator's business.
            "url": if admin { Some(o.url.clone()) } else { None },
            "healthy": o.health.healthy(),
            "last_sync": match o.health.last_sync.get() { 0 => None, t => Some(t) },
            "sync_errors": o.health.errors.get(),
            // Store errors name buckets and keys: for the admin only.
            "last_error": if admin { last_error } else { last_error.map(|_| "the object store failed (details for the admin)".to_string()) },
        });
    }
    axum::Json(answer).into_response()
}

#[derive(serde::Deserialize)]
struct LabelBody {
    version: u64,
    #[serde(default)]
    force: bool,
}

/// `PUT /v1/models/{m}/labels/{l}` with `{"version": N}`.
#[utoipa::path(put, path = "/v1/models/{model}/labels/{label}", tag = "management",
    security(("admin_token" = [])),
    request_body = super::openapi::LabelRequest,
    responses(
        (status = 200, description = "The label points at the version", body = super::openapi::LabelSet),
        (status = 404, description = "No such model or version"),
        (status = 409, description = "The version is not available (set `force` to point at it anyway)"),
    ))]
pub async fn put_model(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    _admin: super::Admin,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Err(wrong) = check_method(&state, &rest, &Method::PUT) {
        return Ok(wrong);
    }
    let t = parse_target(&rest)?;
    let (Some(label), None) = (&t.label, &t.verb) else {
        return Err(ApiError::NotFound(format!(
            "PUT /v1/models/{}: labels are set with PUT /v1/models/{{name}}/labels/{{label}}",
            crate::names::bounded(&rest)
        )));
    };
    let b: LabelBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body must be {{\"version\": N}}: {e}")))?;
    state
        .manager
        .set_label(&t.model, label, b.version, b.force)
        .await?;
    Ok(
        axum::Json(json!({ "name": t.model, "label": label, "version": b.version }))
            .into_response(),
    )
}

/// `DELETE /v1/models/{m}/versions/{v}`.
#[utoipa::path(delete, path = "/v1/models/{model}/versions/{version}", tag = "management",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The version is out of service and deleted from the repository", body = super::openapi::Deleted),
        (status = 404, description = "No such model or version"),
        (status = 409, description = "A label points at the version: move it first"),
    ))]
pub async fn delete_model(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    _admin: super::Admin,
) -> Result<Response, ApiError> {
    if let Err(wrong) = check_method(&state, &rest, &Method::DELETE) {
        return Ok(wrong);
    }
    let t = parse_target(&rest)?;
    let (Some(version), None, None, false) = (t.version, &t.label, &t.verb, t.metadata) else {
        return Err(ApiError::NotFound(format!(
            "DELETE /v1/models/{}: versions are deleted with DELETE /v1/models/{{name}}/versions/{{n}}",
            crate::names::bounded(&rest)
        )));
    };
    state.manager.delete(&t.model, version).await?;
    Ok(axum::Json(json!({ "name": t.model, "version": version, "deleted": true })).into_response())
}

/// Warm-up entry points (see `api::warmup_hook`).
pub(super) async fn warm_plugin(
    state: &AppState,
    servable: &ModelVersion,
    route: &str,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Result<Response, ApiError> {
    let rest = route.trim_start_matches("/v1/models/");
    plugin_infer(
        state,
        servable,
        Method::POST,
        rest,
        headers,
        Bytes::from(body),
    )
    .await
}

pub(super) async fn warm_predict(
    state: &AppState,
    servable: &ModelVersion,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    predict(state, servable, headers, body).await
}

/// `POST /v1/models/{m}/versions`: a bundle archive as the body.
#[utoipa::path(post, path = "/v1/models/{model}/versions", tag = "management",
    security(("admin_token" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A bundle as a .tar.gz (docs/bundle.md), whatever the Content-Type; `nnserve bundle pack` makes one"),
    responses(
        (status = 201, description = "Stored as a new version", body = crate::lifecycle::Stored),
        (status = 200, description = "The same content was stored already (an idempotent re-upload)", body = crate::lifecycle::Stored),
        (status = 400, description = "Not a valid bundle: every reason"),
        (status = 409, description = "The version exists with other content, or the repository is full"),
        (status = 503, description = "The repository cannot store now (the object store is unreachable)"),
    ))]
pub(super) async fn upload(
    state: &AppState,
    model: &str,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    // This route shares its path with inference: the management check runs here.
    let admin = super::Admin::check(state, headers)?;
    if super::declared_length(headers).is_some_and(|n| n > state.max_upload_bytes) {
        // Refused before reading (and before a `100 Continue`).
        return Err(ApiError::TooLarge(format!(
            "the archive is larger than the upload limit of {} bytes (max_upload_bytes)",
            state.max_upload_bytes
        )));
    }
    let stored = state
        .manager
        .receive(model, body.into_data_stream(), admin.full_errors)
        .await?;
    let status = if stored.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(&stored)).into_response())
}

#[utoipa::path(post, path = "/v1/models/{model}:infer", tag = "plugins",
    params(("x-nnserve-timeout-ms" = Option<u64>, Header, description = "Lowers this request's deadline, in milliseconds (docs/http-api.md, Deadlines)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "Any body: the handler plugin reads it"),
    responses(
        (status = 200, description = "The plugin's answer, in the content type it chose", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "The model has no handler plugin, or the plugin refused the body"),
        (status = 404, description = "No such model, version or label"),
        (status = 415, description = "The plugin does not take this content type"),
        (status = 429, description = "The model's queue or the plugin's instances are full; retry after `Retry-After`"),
        (status = 503, description = "No version of the model is available, or the plugin ran out of memory or instances"),
        (status = 504, description = "The plugin's CPU budget or the request's deadline ran out"),
        (status = 500, description = "The plugin trapped or panicked, or answered against HTTP's rules (the message names it)"),
        (status = "default", description = "The plugin's own answer (docs/plugins.md)"),
    ))]
pub(crate) async fn plugin_infer(
    state: &AppState,
    servable: &ModelVersion,
    method: Method,
    rest: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let plugin = servable.handler.as_ref().ok_or_else(|| {
        let m = servable.name();
        ApiError::BadRequest(format!(
            "model '{m}' has no handler plugin; send tensors to /v1/models/{m}:predict or /v2/models/{m}/infer"
        ))
    })?;
    let deadline = state.deadline(&headers)?;
    let request = crate::plugin::HttpRequest {
        method: method.to_string(),
        path: format!("/v1/models/{rest}"),
        content_type: headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        headers: super::header_pairs(&headers),
        body: body.to_vec(),
    };
    let r = plugin.handle(request, deadline).await?;
    plugin_response(state, plugin.name(), r)
}

/// A plugin's answer as an HTTP response (nnserve-core's `plugin_io`, where it is
/// fuzzed): a status in 200-599, valid header names and values, and no header the host
/// owns (`HOST_OWNED_HEADERS`, `proxy-*`: dropped). A plugin that breaks these rules, or
/// answers more than max_response_bytes, gets a 500 that names it and the rule.
fn plugin_response(
    state: &AppState,
    plugin: &str,
    r: crate::plugin::HttpResponse,
) -> Result<Response, ApiError> {
    let (status, headers) =
        nnserve_core::plugin_io::answer_head(r.status, &r.headers, r.content_type.as_deref())
            .map_err(|what| {
                ApiError::Internal(format!(
                    "plugin {plugin} answered with {what}; plugins answer statuses 200-599 with valid header names and values (docs/plugins.md)"
                ))
            })?;
    if r.body.len() > state.max_response_bytes {
        return Err(ApiError::Internal(format!(
            "plugin {plugin} answered with {} bytes, over the server's max_response_bytes of {}",
            r.body.len(),
            state.max_response_bytes
        )));
    }
    let mut resp = (status, r.body).into_response();
    resp.headers_mut().extend(headers);
    Ok(resp)
}

#[utoipa::path(post, path = "/v1/models/{model}:predict", tag = "tfserving",
    params(("x-nnserve-timeout-ms" = Option<u64>, Header, description = "Lowers this request's deadline, in milliseconds (docs/http-api.md, Deadlines)")),
    request_body = super::openapi::PredictRequest,
    responses(
        (status = 200, description = "`predictions` (for `instances`) or `outputs` (for `inputs`)", body = super::openapi::PredictResponse),
        (status = 400, description = "The body or its tensors do not fit the model's signature"),
        (status = 404, description = "No such model, version or label"),
        (status = 429, description = "The model's queue is full; retry after `Retry-After`"),
        (status = 503, description = "No version of the model is available (loading, unloaded or failed), or the server is draining"),
        (status = 504, description = "The request's deadline ran out"),
        (status = 500, description = "The model's forward failed, or its handler plugin trapped (the message says which)"),
    ))]
pub(super) async fn predict(
    state: &AppState,
    servable: &ModelVersion,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let spec = servable.model_spec();
    let parsing = state.json_gate.enter(body.len()).await;
    let (inputs, row_format) =
        nnserve_core::tfserving::decode_predict(spec, body).map_err(ApiError::BadRequest)?;
    drop(parsing); // the JSON values are gone; the tensors are compact
    let outputs = infer_within(state, headers, servable.runner(), inputs).await?;
    super::check_answer_size(
        state,
        outputs
            .iter()
            .map(|(n, t)| codec::json_bound(t) + (n.len() as u64 * 6 + 8) * rows_of(t)),
    )?;
    let mut out = Vec::with_capacity(256);
    if row_format {
        write_predictions(&mut out, &outputs).map_err(ApiError::Internal)?;
    } else {
        write_outputs(&mut out, &outputs);
    }
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tf_serving_paths() {
        let t = parse_target("mlp:predict").unwrap();
        assert_eq!(
            (t.model.as_str(), t.version, t.verb.as_deref()),
            ("mlp", None, Some("predict"))
        );
        let t = parse_target("mlp/versions/3:infer").unwrap();
        assert_eq!((t.version, t.verb.as_deref()), (Some(3), Some("infer")));
        let t = parse_target("mlp/labels/stable:predict").unwrap();
        assert_eq!(t.label.as_deref(), Some("stable"));
        let t = parse_target("mlp/versions/2/metadata").unwrap();
        assert!(t.metadata && t.version == Some(2));
        assert!(parse_target("mlp").unwrap().verb.is_none());
        assert!(matches!(
            parse_target("mlp/versions/x"),
            Err(ApiError::BadRequest(_))
        ));
        // Names and versions are checked before anything else.
        for bad in [
            "..",
            "../versions/7",
            "%2e%2e",
            ".meta",
            "mlp/labels/..",
            "mlp/labels/a b",
            "mlp/versions/0",
            "mlp/versions/18446744073709551615",
            "a\\b:predict",
        ] {
            assert!(
                matches!(parse_target(bad), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_target("ResNet50:predict").unwrap().model, "ResNet50");
        assert!(matches!(
            parse_target("mlp/bogus"),
            Err(ApiError::NotFound(_))
        ));
    }
}
