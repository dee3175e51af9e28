//! A handler plugin's bundle called through the tensor protocol (KServe v2 over HTTP and
//! gRPC): the request body travels as the one element of a BYTES input, the answer's
//! body as the one element of the BYTES output [`BODY_OUTPUT`] (docs/http-api.md,
//! "BYTES and handler plugins"). The plugin sees the same call as
//! `POST /v1/models/{model}/versions/{version}:infer`.

use super::{ApiError, AppState};
use crate::lifecycle::ModelVersion;
use crate::names::bounded;
use axum::http::HeaderMap;
use bytes::Bytes;

/// The datatype of a tensor of byte strings.
pub const BYTES: &str = "BYTES";

/// The name of the one BYTES output of a handler plugin's answer.
pub const BODY_OUTPUT: &str = "body";

/// Whether a request with these input datatypes goes to the handler plugin: the model
/// has one, and the request has one input, of datatype BYTES.
pub fn is_body_call<'a>(
    s: &ModelVersion,
    mut datatypes: impl ExactSizeIterator<Item = &'a str>,
) -> bool {
    s.handler.is_some() && datatypes.len() == 1 && datatypes.next() == Some(BYTES)
}

/// The answer of a handler plugin: its body and content type.
pub struct BodyAnswer {
    pub body: Bytes,
    pub content_type: Option<String>,
}

/// Calls the handler plugin with `body` (of `content_type`). A plugin's answer of 4xx or
/// 5xx becomes the error of its status, with its body (bounded) as the message.
pub async fn call_handler(
    state: &AppState,
    s: &ModelVersion,
    headers: &HeaderMap,
    body: Bytes,
    content_type: Option<&str>,
) -> Result<BodyAnswer, ApiError> {
    let mut headers = headers.clone();
    headers.remove(axum::http::header::CONTENT_LENGTH);
    match content_type.map(axum::http::HeaderValue::try_from) {
        Some(Ok(v)) => {
            headers.insert(axum::http::header::CONTENT_TYPE, v);
        }
        Some(Err(_)) => {
            return Err(ApiError::BadRequest(
                "the content_type parameter is not a valid header value".into(),
            ))
        }
        None => {
            headers.remove(axum::http::header::CONTENT_TYPE);
        }
    }
    let rest = format!("{}/versions/{}:infer", s.name(), s.version());
    let resp =
        super::plugin_infer(state, s, axum::http::Method::POST, &rest, headers, body).await?;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // plugin_infer bounded the body by max_response_bytes already.
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(format!("reading the plugin's answer: {e}")))?;
    if !status.is_success() {
        let text = bounded(&String::from_utf8_lossy(&body));
        let msg = format!("the plugin answered {}: {text}", status.as_u16());
        return Err(match status.as_u16() {
            404 => ApiError::NotFound(msg),
            415 => ApiError::UnsupportedMediaType(msg),
            429 => ApiError::TooManyRequests(msg),
            503 => ApiError::Unavailable(msg),
            504 => ApiError::Timeout(msg),
            400..=499 => ApiError::BadRequest(msg),
            _ => ApiError::Internal(msg),
        });
    }
    Ok(BodyAnswer { body, content_type })
}

pub use nnserve_core::plugin_io::{bytes_element, split_bytes_elements};

/// The one element a handler plugin takes, or why the input is not one.
pub fn one_element<T>(input: &str, elements: Vec<T>) -> Result<T, ApiError> {
    let n = elements.len();
    let mut it = elements.into_iter();
    match (it.next(), n) {
        (Some(e), 1) => Ok(e),
        _ => Err(ApiError::BadRequest(format!(
            "input '{}' holds {n} elements; a handler plugin takes one, the request body (shape [1])",
            bounded(input)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_takes_one_element() {
        assert!(one_element("x", vec![1, 2]).is_err());
        assert_eq!(one_element("x", vec![7]).unwrap(), 7);
    }
}
