//! Request, response and error helpers over the generated WIT types.

use crate::bindings::nnserve::plugin::types;
use serde::{de::DeserializeOwned, Serialize};

pub use types::{Error, ErrorCode, Request, Response};

impl Request {
    /// The first value of a header (names are matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; a body that does not parse is a 400 that says why.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::bad_request(format!("request body is not valid JSON: {e}")))
    }
}

impl Response {
    /// A 200 response with a JSON body.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Response, Error> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot encode the response: {e}")))?;
        Ok(Response::bytes("application/json", body))
    }

    /// A 200 response with the given media type and body.
    pub fn bytes(content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status: 200,
            content_type: Some(content_type.to_string()),
            headers: Vec::new(),
            body,
        }
    }

    /// Sets the HTTP status.
    pub fn with_status(mut self, status: u16) -> Response {
        self.status = status;
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

impl Error {
    /// An error with this code (its HTTP status) and message (`{"error": message}`).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }
    /// 400: the request is not what the plugin accepts.
    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::BadRequest, message)
    }
    /// 415: the body's media type is not supported.
    pub fn unsupported_media_type(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::UnsupportedMediaType, message)
    }
    /// 404: something the request names does not exist.
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::NotFound, message)
    }
    /// 500: the plugin or the model failed.
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Internal, message)
    }
    /// 503: cannot serve now, retry later.
    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Unavailable, message)
    }
}
