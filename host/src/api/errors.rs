//! Every failure of the API as a status and `{"error": message}`, and the conversions
//! from the errors of the modules beneath (`lifecycle`, `nn`, `plugin`).

use super::AppState;
use crate::lifecycle::{ResolveError, UploadError};
use crate::nn::InferError;
use crate::plugin::PluginError;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

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
    pub(crate) fn outcome(&self) -> &'static str {
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

    pub(crate) fn status(&self) -> StatusCode {
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

    pub(crate) fn message(&self) -> &str {
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
        use crate::plugin::GuestCode as ErrorCode;
        let msg = e.to_string();
        match e {
            PluginError::Guest(g) => match g.code {
                ErrorCode::BadRequest => ApiError::BadRequest(msg),
                ErrorCode::UnsupportedMediaType => ApiError::UnsupportedMediaType(msg),
                ErrorCode::NotFound => ApiError::NotFound(msg),
                ErrorCode::Internal => ApiError::Internal(msg),
                ErrorCode::Unavailable => ApiError::Unavailable(msg),
            },
            PluginError::Trap { .. } | PluginError::Panic { .. } => ApiError::Internal(msg),
            PluginError::CpuBudget { .. } | PluginError::Deadline { .. } => ApiError::Timeout(msg),
            PluginError::Busy { .. } | PluginError::MemoryFull { .. } => ApiError::Unavailable(msg),
            PluginError::Overloaded(_) => ApiError::TooManyRequests(msg),
        }
    }
}

/// A management failure (upload, label, delete, load) as an HTTP error.
impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
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
            UploadError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

/// Errors that axum itself answers (a body over the limit, a path that is not UTF-8, a
/// method a route does not take) come as plain text or with no body; every error of this
/// API is `{"error": message}`. Inference answers (which name their version in
/// `x-nnserve-variant`, and may be a plugin's own error page) pass untouched.
pub(super) async fn errors_as_json(
    axum::extract::State(state): axum::extract::State<AppState>,
    resp: Response,
) -> Response {
    let status = resp.status();
    state.metrics.api_request("http", outcome_of_status(status));
    if !(status.is_client_error() || status.is_server_error())
        || resp.headers().contains_key(super::VARIANT_HEADER)
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

/// The metrics outcome of an HTTP status (as [`ApiError::outcome`] maps errors).
fn outcome_of_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 | 503 => "overload",
        408 | 504 => "timeout",
        400..=499 => "client_error",
        500..=599 => "server_error",
        _ => "ok",
    }
}
