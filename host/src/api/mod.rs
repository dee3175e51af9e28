//! The HTTP API (axum): TF Serving REST (`/v1`), KServe v2 / Open Inference Protocol
//! (`/v2`) and the plugin endpoint (`:infer`). Routes are built in [`router`]; every
//! failure becomes a status and `{"error": message}` in [`ApiError`].
//!
//! `api` resolves the target in the `lifecycle` registry, then calls `plugin` or
//! `nn`; it never touches a backend directly.

mod codec;
mod v1;
mod v2;

use crate::lifecycle::{Registry, ResolveError, Servable};
use crate::nn::InferError;
use crate::plugin::PluginError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub manager: Arc<crate::manage::Manager>,
    /// The digest of the management API's bearer token, when one is configured.
    pub admin_token: Option<TokenDigest>,
    /// Who may manage (`off`: the routes are not mounted at all).
    pub management: crate::config::Management,
    /// Largest inference request body.
    pub max_request_bytes: usize,
    /// Largest answer to build (tensor APIs and plugin bodies).
    pub max_response_bytes: usize,
    /// Largest upload body (a bundle archive).
    pub max_upload_bytes: u64,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The request's wall-clock deadline unless the client asks for less.
    pub request_timeout: Duration,
    /// Live stats of endpoint variants, handed to routers.
    pub routing_stats: Arc<crate::routing::StatsBook>,
    /// Bounds the JSON bodies parsed at once (see [`JsonGate`]).
    pub json_gate: Arc<JsonGate>,
}

/// JSON numbers parse into `serde_json::Value`s of 32 bytes and more each, so a body of
/// `0,0,0,...` takes about 30 times its size while it is turned into tensors: four 60 MiB
/// bodies at once took 5.7 GB. Bodies from [`JsonGate::LARGE`] bytes up take their size
/// from a budget of `max_request_bytes` while they are parsed, so the bodies being parsed
/// at once are never more than one of the largest allowed; small bodies pass freely.
pub struct JsonGate {
    budget: tokio::sync::Semaphore,
    capacity: u32,
}

impl JsonGate {
    pub const LARGE: usize = 1 << 20;

    pub fn new(max_request_bytes: usize) -> JsonGate {
        let capacity = max_request_bytes.clamp(Self::LARGE, u32::MAX as usize) as u32;
        JsonGate {
            budget: tokio::sync::Semaphore::new(capacity as usize),
            capacity,
        }
    }

    /// Waits until a body of `len` bytes may be parsed; hold the permit until its values
    /// are dropped. `None` for a small body.
    pub async fn enter(&self, len: usize) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if len < Self::LARGE {
            return None;
        }
        let n = (len.min(u32::MAX as usize) as u32).min(self.capacity);
        let permit = self.budget.acquire_many(n).await.ok();
        crate::alloc::collect_after_delay();
        permit
    }
}

/// Copies in flight to one shadow variant past which further copies are dropped
/// (counted as `outcome="dropped"`), so a slow shadow cannot pile up memory.
const SHADOW_MAX_IN_FLIGHT: u32 = 64;

/// Response header naming the model version that answered: `{model}@{version}`.
pub const VARIANT_HEADER: &str = "x-nnserve-variant";

/// Header with which a client lowers its request's deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-nnserve-timeout-ms";

impl AppState {
    /// The deadline for this request: the server's, or the client's if lower.
    fn deadline(&self, headers: &HeaderMap) -> Result<Duration, ApiError> {
        let Some(v) = headers.get(TIMEOUT_HEADER) else {
            return Ok(self.request_timeout);
        };
        let ms = v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{TIMEOUT_HEADER} must be a whole number of milliseconds, not {:?}",
                    String::from_utf8_lossy(v.as_bytes())
                ))
            })?;
        Ok(Duration::from_millis(ms).min(self.request_timeout))
    }
}

/// The admin token as compared: its sha256, so that the comparison takes the same time
/// whatever the given token's length and content (`subtle`).
#[derive(Clone)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &str) -> TokenDigest {
        use sha2::Digest;
        TokenDigest(sha2::Sha256::digest(token.as_bytes()).into())
    }

    fn matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        TokenDigest::of(given).0.ct_eq(&self.0).into()
    }
}

/// Builds the whole HTTP surface. Under `management = off` no management route exists:
/// uploads, deletes, labels and Triton's repository routes answer 404 or 405.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let managed = state.management != crate::config::Management::Off;
    let models = get(v1::get_model).post(v1::post_model);
    let models = if managed {
        models.put(v1::put_model).delete(v1::delete_model)
    } else {
        models
    };
    let router = Router::new()
        .route("/v1/models", get(v1::list_models))
        .route("/v1/models/{*rest}", models)
        .route("/metrics", get(metrics))
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
            get(v2::model_metadata_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(v2::model_ready_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(v2::infer_version),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            errors_as_json,
        ));
    // The per-request log line costs a middleware layer on every request; add it only
    // when debug logging is on (it is chosen at start-up).
    let router = if tracing::enabled!(tracing::Level::DEBUG) {
        router.layer(axum::middleware::from_fn(log_request))
    } else {
        router
    };
    router.with_state(state)
}

/// Errors that axum itself answers (a body over the limit, a path that is not UTF-8, a
/// method a route does not take) come as plain text or with no body; every error of this
/// API is `{"error": message}`. Inference answers (which name their version in
/// `x-nnserve-variant`, and may be a plugin's own error page) pass untouched.
async fn errors_as_json(
    axum::extract::State(state): axum::extract::State<AppState>,
    resp: Response,
) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp.headers().contains_key(VARIANT_HEADER)
        || resp
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
    {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is over {} bytes (max_request_bytes)",
            state.max_request_bytes
        ),
        StatusCode::METHOD_NOT_ALLOWED => match parts
            .headers
            .get(axum::http::header::ALLOW)
            .and_then(|v| v.to_str().ok())
        {
            Some(allow) => format!("this route does not take this method; it takes {allow}"),
            None => "this route does not take this method (the routes: docs/http-api.md)".into(),
        },
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    let mut resp = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    for name in [axum::http::header::ALLOW, axum::http::header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            resp.headers_mut().insert(name, v.clone());
        }
    }
    resp
}

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

/// Every failure of the API, as a status and a message.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    UnsupportedMediaType(String),
    Internal(String),
    /// 401: the management API's bearer token is missing or wrong.
    Unauthorized(String),
    /// 409: a version exists with other content.
    Conflict(String),
    /// 413.
    TooLarge(String),
    /// 408: the request body stopped arriving.
    SlowClient(String),
    /// 429 with `Retry-After`: a model's queue is full.
    TooManyRequests(String),
    /// 503 with `Retry-After`.
    Unavailable(String),
    /// 504: a budget or deadline ran out.
    Timeout(String),
}

impl ApiError {
    /// The `outcome` label of the requests metric.
    fn outcome(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_)
            | ApiError::NotFound(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::Unauthorized(_)
            | ApiError::Conflict(_)
            | ApiError::TooLarge(_)
            | ApiError::SlowClient(_) => "client_error",
            ApiError::Internal(_) => "server_error",
            ApiError::TooManyRequests(_) | ApiError::Unavailable(_) => "overload",
            ApiError::Timeout(_) => "timeout",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::SlowClient(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Internal(m)
            | ApiError::TooManyRequests(m)
            | ApiError::Unauthorized(m)
            | ApiError::Conflict(m)
            | ApiError::TooLarge(m)
            | ApiError::SlowClient(m)
            | ApiError::Unavailable(m)
            | ApiError::Timeout(m) => m,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "{}", self.message());
        }
        let body = serde_json::json!({ "error": self.message() });
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::NotAvailable(..) => ApiError::Unavailable(e.to_string()),
            _ => ApiError::NotFound(e.to_string()),
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::BadInput(m) => ApiError::BadRequest(m),
            InferError::Model(m) => ApiError::Internal(m),
            InferError::Overloaded(m) => ApiError::TooManyRequests(m),
        }
    }
}

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        use crate::wit::ErrorCode;
        let msg = e.to_string();
        match e {
            PluginError::Guest(g) => match g.code {
                ErrorCode::BadRequest => ApiError::BadRequest(msg),
                ErrorCode::UnsupportedMediaType => ApiError::UnsupportedMediaType(msg),
                ErrorCode::NotFound => ApiError::NotFound(msg),
                ErrorCode::Internal => ApiError::Internal(msg),
                ErrorCode::Unavailable => ApiError::Unavailable(msg),
            },
            PluginError::Trap { .. } => ApiError::Internal(msg),
            PluginError::CpuBudget { .. } | PluginError::Deadline { .. } => ApiError::Timeout(msg),
            PluginError::Busy { .. } | PluginError::MemoryFull { .. } => ApiError::Unavailable(msg),
            PluginError::Overloaded(_) => ApiError::TooManyRequests(msg),
        }
    }
}

/// The hook that replays a version's `warmup/*.json` through the same handlers clients
/// reach, against that version (not yet published). Any answer but 2xx fails the load.
pub fn warmup_hook(state: AppState) -> crate::lifecycle::WarmupHook {
    Arc::new(move |servable: Arc<crate::lifecycle::Servable>| {
        let state = state.clone();
        Box::pin(async move {
            if servable.endpoint.is_some() {
                // An endpoint has no model of its own to warm; its router was compiled.
                return Ok(());
            }
            let requests = servable.bundle.warmup_requests()?;
            for (file, req) in requests {
                let body = req.body_bytes().map_err(|e| format!("{file}: {e}"))?;
                let mut headers = HeaderMap::new();
                if let Some(ct) = req
                    .content_type
                    .as_deref()
                    .and_then(|c| HeaderValue::from_str(c).ok())
                {
                    headers.insert(axum::http::header::CONTENT_TYPE, ct);
                }
                let route = req.route.as_str();
                let result = if route.ends_with(":infer") {
                    v1::warm_plugin(&state, &servable, route, headers, body).await
                } else if route.ends_with(":predict") {
                    v1::warm_predict(&state, &servable, &headers, &body).await
                } else if route.starts_with("/v2/") && route.ends_with("/infer") {
                    v2::warm_infer(&state, &servable, &headers, &body).await
                } else {
                    return Err(format!(
                        "{file}: route {route:?} is not an inference route (:infer, :predict or /v2/.../infer)"
                    ));
                };
                match result {
                    Ok(resp) if resp.status().is_success() => {}
                    Ok(resp) => {
                        return Err(format!(
                            "warm-up {file} to {route} answered {}",
                            resp.status()
                        ))
                    }
                    Err(e) => {
                        return Err(format!("warm-up {file} to {route} failed: {}", e.message()))
                    }
                }
            }
            Ok(())
        })
    })
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

/// Whether this request may manage: always under `open`, with `Authorization: Bearer
/// <token>` under `token`, never under `off` (its routes are not even mounted).
fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    use crate::config::Management;
    let token = match (state.management, &state.admin_token) {
        (Management::Open, _) => return Ok(()),
        (Management::Off, _) | (Management::Token, None) => {
            return Err(ApiError::NotFound(
                "the management API is off on this server (--management off)".into(),
            ))
        }
        (Management::Token, Some(token)) => token,
    };
    // The scheme is case-insensitive (RFC 9110); the token is compared as sent.
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(g) if token.matches(g) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("the bearer token is wrong".into())),
        None => Err(ApiError::Unauthorized(
            "the management API needs `Authorization: Bearer <token>` (the server's --admin-token-file)"
                .into(),
        )),
    }
}

/// Whether the caller proved it is the administrator: a token is configured and the
/// request carries it. Only then do answers show full internal errors (a failed load's
/// libtorch error with paths and stack frames); everyone else gets the public reason.
pub(crate) fn is_admin(state: &AppState, headers: &HeaderMap) -> bool {
    state.management == crate::config::Management::Token && check_admin(state, headers).is_ok()
}

/// A version's error as this caller may see it (see [`is_admin`]).
pub(crate) fn error_for(admin: bool, status: &crate::lifecycle::VersionStatus) -> Option<String> {
    if admin {
        status.error.clone()
    } else {
        status.public_error()
    }
}

/// A management failure as an HTTP error.
pub(crate) fn manage_error(e: crate::manage::UploadError) -> ApiError {
    use crate::manage::UploadError;
    match e {
        UploadError::Invalid(reasons) => {
            ApiError::BadRequest(format!("invalid bundle: {}", reasons.join("; ")))
        }
        UploadError::Conflict(m) | UploadError::NoRoom(m) => ApiError::Conflict(m),
        UploadError::BadRequest(m) => ApiError::BadRequest(m),
        UploadError::TooLarge(m) => ApiError::TooLarge(m),
        UploadError::NotFound(m) => ApiError::NotFound(m),
        UploadError::SlowClient(m) => ApiError::SlowClient(m),
        UploadError::Internal(m) => ApiError::Internal(m),
    }
}

/// Counts a request to a resolved version in the metrics once it ends: with its outcome
/// when it finishes ([`Recording::finish`]), or as `cancelled` when its future is dropped
/// first (the client went away: hyper drops the handler when the connection closes).
struct Recording<'a> {
    state: &'a AppState,
    target: &'a crate::lifecycle::Servable,
    started: Instant,
    done: bool,
}

impl<'a> Recording<'a> {
    fn start(state: &'a AppState, target: &'a crate::lifecycle::Servable) -> Self {
        Recording {
            state,
            target,
            started: Instant::now(),
            done: false,
        }
    }

    fn finish<T>(mut self, result: &Result<T, ApiError>) {
        self.done = true;
        record(self.state, self.target, self.started, result);
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.state.metrics.request(
                self.target.name(),
                self.target.version(),
                CANCELLED,
                self.started.elapsed(),
            );
        }
    }
}

/// The outcome of a request whose client went away before its answer.
const CANCELLED: &str = "cancelled";

/// Counts a finished request to a resolved version in the metrics.
fn record<T>(
    state: &AppState,
    s: &crate::lifecycle::Servable,
    started: Instant,
    result: &Result<T, ApiError>,
) {
    let took = started.elapsed();
    if result.is_ok()
        && s.runner
            .as_ref()
            .is_some_and(|r| r.metrics().request_ok(took))
    {
        return;
    }
    state
        .metrics
        .request(s.name(), s.version(), outcome_of(result), took);
}

/// The inference verbs, run the same way for a model and for an endpoint's variant.
#[derive(Clone)]
pub(crate) enum Verb {
    /// TF Serving `:predict`.
    Predict,
    /// The handler plugin (`:infer`); `rest` is the path after `/v1/models/`.
    Infer { rest: String },
    /// KServe v2 `infer`.
    V2Infer,
}

async fn run_verb(
    state: &AppState,
    verb: &Verb,
    s: &Servable,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    match verb {
        Verb::Predict => v1::predict(state, s, headers, &body).await,
        Verb::Infer { rest } => {
            v1::plugin_infer(state, s, method.clone(), rest, headers.clone(), body).await
        }
        Verb::V2Infer => v2::infer_resolved(state, s, headers, &body).await,
    }
}

/// Resolves a name for metadata and readiness: a model version, or for an endpoint its
/// default variant's model (with `version` or `label` applied to that model).
pub(crate) fn resolve_model(
    state: &AppState,
    name: &str,
    version: Option<u64>,
    label: Option<&str>,
) -> Result<Arc<Servable>, ApiError> {
    let by_label = |name: &str| -> Result<Arc<Servable>, ApiError> {
        let version = match label {
            Some(l) => Some(state.registry.label(name, l)?),
            None => version,
        };
        Ok(state.registry.resolve(name, version)?)
    };
    let Ok(latest) = state.registry.resolve(name, None) else {
        return by_label(name);
    };
    let Some(e) = &latest.endpoint else {
        return by_label(name);
    };
    if version.is_none() && label.is_none() {
        return Ok(e.default_target(&state.registry)?);
    }
    let v = e
        .variants
        .iter()
        .find(|v| v.name() == e.default_variant)
        .expect("checked: default_variant names a variant");
    let s = by_label(&v.model)?;
    if s.endpoint.is_some() {
        // Never follow an endpoint to another endpoint (they could name each other).
        return Err(ApiError::Unavailable(format!(
            "endpoint '{name}': its default variant '{}' names the endpoint '{}', not a model",
            v.name(),
            v.model
        )));
    }
    Ok(s)
}

/// Serves one inference request to `name`: a model, or an endpoint whose router picks
/// the variant (unless a version or label is given, which goes to the default variant's
/// model, bypassing the router). Every answer names the version that served it in
/// `x-nnserve-variant`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_inference(
    state: &AppState,
    name: &str,
    version: Option<u64>,
    label: Option<&str>,
    verb: Verb,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let explicit = version.is_some() || label.is_some();
    // One registry lookup on the common path: a model by name.
    let latest = if explicit {
        None
    } else {
        Some(state.registry.resolve(name, None)?)
    };
    let (endpoint_servable, target) = match latest {
        Some(s) if s.endpoint.is_some() => (Some(s), None),
        Some(s) => (None, Some(s)),
        None => (None, Some(resolve_model(state, name, version, label)?)),
    };
    let Some(endpoint_servable) = endpoint_servable else {
        let target = target.expect("a model when not an endpoint");
        let recording = Recording::start(state, &target);
        let result = run_verb(state, &verb, &target, &method, &headers, body).await;
        recording.finish(&result);
        return Ok(with_variant(result, &target));
    };
    let endpoint = endpoint_servable.endpoint.as_ref().expect("filtered above");
    let started = Instant::now();
    let meta = crate::routing::Meta {
        method: method.to_string(),
        path: path.to_string(),
        headers: header_pairs(&headers),
    };
    let routed = crate::routing::route(
        endpoint,
        &state.registry,
        &state.routing_stats,
        &state.metrics,
        meta,
        state.deadline(&headers)?,
    )
    .await
    .map_err(|e| {
        state
            .metrics
            .variant_request(&endpoint.name, "-", false, "overload", started.elapsed());
        ApiError::Unavailable(e.to_string())
    })?;
    if let Some(reason) = &routed.reason {
        tracing::debug!(endpoint = %endpoint.name, variant = %routed.variant, "routed: {reason}");
    }
    let window = Duration::from_millis(endpoint.spec.stats_window_ms);
    for (variant, target) in routed.shadows {
        let (state, verb, method, headers, body) = (
            state.clone(),
            verb.clone(),
            method.clone(),
            headers.clone(),
            body.clone(),
        );
        let name = endpoint.name.clone();
        let stats = state.routing_stats.get(&name, &variant, window);
        if stats.in_flight() >= SHADOW_MAX_IN_FLIGHT {
            // A slow shadow must not pile up copies: drop this one, and count it.
            state
                .metrics
                .variant_request(&name, &variant, true, "dropped", Duration::ZERO);
            continue;
        }
        tokio::spawn(async move {
            let guard = stats.start();
            let t0 = Instant::now();
            let result = run_verb(&state, &verb, &target, &method, &headers, body).await;
            record(&state, &target, t0, &result);
            let outcome = outcome_of(&result);
            guard.finish(is_server_error(&result));
            state
                .metrics
                .variant_request(&name, &variant, true, outcome, t0.elapsed());
        });
    }
    let target = routed.target;
    let stats = state
        .routing_stats
        .get(&endpoint.name, &routed.variant, window);
    let guard = stats.start();
    let recording = Recording::start(state, &target);
    let result = run_verb(state, &verb, &target, &method, &headers, body).await;
    recording.finish(&result);
    guard.finish(is_server_error(&result));
    state.metrics.variant_request(
        &endpoint.name,
        &routed.variant,
        false,
        outcome_of(&result),
        started.elapsed(),
    );
    Ok(with_variant(result, &target))
}

/// Headers as the plugins see them: lower-case names, values as text.
pub(crate) fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn outcome_of<T>(result: &Result<T, ApiError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.outcome(),
    }
}

/// A 5xx, which counts against a variant in the live stats (a 4xx is the client's).
fn is_server_error(result: &Result<Response, ApiError>) -> bool {
    match result {
        Ok(r) => r.status().is_server_error(),
        Err(e) => e.status().is_server_error(),
    }
}

/// The answer (or the error) with `x-nnserve-variant: {model}@{version}`.
fn with_variant(result: Result<Response, ApiError>, target: &Servable) -> Response {
    let mut resp = result.into_response();
    if let Ok(v) = HeaderValue::from_maybe_shared(target.id.clone()) {
        resp.headers_mut().insert(VARIANT_HEADER, v);
    }
    resp
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

/// Refuses an answer whose parts (upper bounds of their bytes) add up to more than
/// `max_response_bytes`, before it is built.
pub(crate) fn check_answer_size(
    state: &AppState,
    parts: impl IntoIterator<Item = u64>,
) -> Result<(), ApiError> {
    let bytes = parts.into_iter().fold(0u64, u64::saturating_add);
    if bytes > state.max_response_bytes as u64 {
        return Err(ApiError::Internal(format!(
            "the answer would take up to {bytes} bytes, over the server's max_response_bytes of {}: \
             ask for fewer rows or outputs, binary outputs (binary_data_output), or raise max_response_bytes",
            state.max_response_bytes
        )));
    }
    Ok(())
}

/// Runs a tensor-API inference within the request's deadline.
async fn infer_within(
    state: &AppState,
    headers: &HeaderMap,
    runner: &crate::nn::Runner,
    inputs: Vec<(String, crate::tensor::Tensor)>,
) -> Result<Vec<(String, crate::tensor::Tensor)>, ApiError> {
    let deadline = state.deadline(headers)?;
    match tokio::time::timeout(deadline, runner.infer(inputs)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ApiError::Timeout(format!(
            "request deadline of {} ms passed while the request waited for or ran the model",
            deadline.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_json_bodies_are_parsed_within_one_max_request_of_memory() {
        let gate = JsonGate::new(64 << 20);
        assert!(gate.enter(1000).await.is_none(), "small bodies pass freely");
        let a = gate
            .enter(40 << 20)
            .await
            .expect("a large body takes its size");
        let blocked = tokio::time::timeout(Duration::from_millis(50), gate.enter(40 << 20)).await;
        assert!(
            blocked.is_err(),
            "two 40 MiB bodies may not be parsed at once under 64 MiB"
        );
        let small = gate.enter(20 << 20).await;
        assert!(small.is_some(), "a 20 MiB one still fits beside it");
        drop((a, small));
        assert!(
            gate.enter(64 << 20).await.is_some(),
            "one body of the largest size fits"
        );
        // A limit beyond u32 bytes still admits the largest body.
        let huge = JsonGate::new(usize::MAX);
        assert!(huge.enter(usize::MAX).await.is_some());
    }

    #[test]
    fn every_error_maps_to_an_outcome_the_metrics_know() {
        // A retired version's series are removed outcome by outcome (metrics::OUTCOMES):
        // an outcome missing there would stay exported forever.
        let m = String::new;
        for e in [
            ApiError::BadRequest(m()),
            ApiError::NotFound(m()),
            ApiError::UnsupportedMediaType(m()),
            ApiError::Internal(m()),
            ApiError::Unauthorized(m()),
            ApiError::Conflict(m()),
            ApiError::TooLarge(m()),
            ApiError::SlowClient(m()),
            ApiError::TooManyRequests(m()),
            ApiError::Unavailable(m()),
            ApiError::Timeout(m()),
        ] {
            assert!(
                crate::metrics::OUTCOMES.contains(&e.outcome()),
                "{}",
                e.outcome()
            );
        }
        assert!(crate::metrics::OUTCOMES.contains(&outcome_of(&Ok::<(), ApiError>(()))));
        assert!(crate::metrics::OUTCOMES.contains(&CANCELLED));
    }
}
