//! The HTTP API (axum): TF Serving REST (`/v1`), KServe v2 / Open Inference Protocol
//! (`/v2`) and the plugin endpoint (`:infer`). Its rooms: [`router`] here (the routes),
//! `state` (what handlers share), `errors` (every failure as a status), `admin` (who may
//! manage), `inference` (one request: resolve, route, run, count), `warmup`, and the
//! protocols `v1`, `v2` with their `codec`.
//!
//! `api` resolves the target in the `lifecycle` registry, asks `routing` for an
//! endpoint's variant, then calls `plugin` or `nn`; it never touches a backend directly,
//! and changes the model's life only through the `lifecycle` manager's triggers.

mod admin;
pub(crate) mod body_call;
use nnserve_core::codec;
mod errors;
mod inference;
pub mod openapi;
mod probe;
pub(crate) mod request_id;
mod state;
mod v1;
mod v2;
mod warmup;

pub use errors::ApiError;
pub use probe::Probe;
pub use state::{AppState, JsonGate, TokenDigest};
pub use warmup::warmup_hook;

pub(crate) use admin::{error_for, is_admin, Admin};
pub(crate) use inference::infer_within;
pub(crate) use inference::{
    check_answer_size, header_pairs, resolve_model, serve, serve_inference, Run, Verb,
};
pub(crate) use v1::plugin_infer;
pub(crate) use v2::{available_versions, model_platform, repository_entries};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::time::Instant;

/// Response header naming the model version that answered: `{model}@{version}`.
pub const VARIANT_HEADER: &str = "x-nnserve-variant";

/// Header with which a client lowers its request's deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-nnserve-timeout-ms";

/// Builds the whole HTTP surface. Under `management = off` no management route exists:
/// uploads, deletes, labels and Triton's repository routes answer 404 or 405.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let managed = state.management != crate::config::Management::Off;
    let models = get(v1::get_model).post(v1::post_model);
    let models = if managed {
        models.put(v1::put_model).delete(v1::delete_model)
    } else {
        models
    }
    .fallback(v1::other_method);
    let router = Router::new()
        .route("/v1/models", get(v1::list_models))
        .route("/v1/models/{*rest}", models)
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready));
    let router = if managed {
        router
            .route("/v2/repository/index", post(v2::repository_index))
            .route(
                "/v2/repository/models/{model}/load",
                post(v2::repository_load),
            )
            .route(
                "/v2/repository/models/{model}/unload",
                post(v2::repository_unload),
            )
    } else {
        router
    };
    let router = router
        .route("/v2/models/{model}", get(v2::model_metadata))
        .route("/v2/models/{model}/ready", get(v2::model_ready))
        .route("/v2/models/{model}/infer", post(v2::infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(v2::model_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(v2::model_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(v2::infer),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            errors::errors_as_json,
        ));
    // The per-request log line costs a middleware layer on every request; add it only
    // when debug logging is on (it is chosen at start-up).
    let router = if tracing::enabled!(tracing::Level::DEBUG) {
        router.layer(axum::middleware::from_fn(log_request))
    } else {
        router
    };
    router
        .layer(axum::middleware::from_fn(request_id::layer))
        .with_state(state)
}

#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Prometheus / OpenMetrics text (docs/http-api.md, Metrics)", content_type = "application/openmetrics-text", body = String)))]
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}; see docs/http-api.md for the routes",
        req.method(),
        req.uri().path()
    ))
}

/// One line per request at debug level.
async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), took = ?started.elapsed(), "request");
    resp
}

/// A model or endpoint name from a URL, checked against the naming rule before the
/// request goes anywhere (`names`): `..` or `a/b` never reaches the registry or a path.
pub(crate) fn model_name(name: &str) -> Result<&str, ApiError> {
    crate::names::check_name("model name", name).map_err(ApiError::BadRequest)?;
    Ok(name)
}

/// A version from a URL: 1 to 2^63-1, as TF Serving and Triton number versions.
pub(crate) fn version_param(text: &str) -> Result<u64, ApiError> {
    crate::names::parse_version(text).map_err(ApiError::BadRequest)
}

/// The request's `Content-Length`, when it has one.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Reads an inference request's body, at most `max_request_bytes`. A `Content-Length`
/// over the limit is refused before anything is read (and before a `100 Continue`), so a
/// client declaring a huge body gets its 413 at once instead of a wait for the body.
pub(crate) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::TooLarge(format!(
            "the request body is over {} bytes (max_request_bytes)",
            state.max_request_bytes
        ))
    };
    if declared_length(headers).is_some_and(|n| n > state.max_request_bytes as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, state.max_request_bytes)
        .await
        .map_err(|e| {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                if let Some(t) = c.downcast_ref::<crate::connections::BodyTimeout>() {
                    return ApiError::SlowClient(t.to_string());
                }
                cause = c.source();
            }
            if over {
                too_large()
            } else {
                ApiError::BadRequest(format!("the request body could not be read: {e}"))
            }
        })
}
