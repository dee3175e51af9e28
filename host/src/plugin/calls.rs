//! What `api` and `routing` hand to plugins and get back: small hand-written types, so
//! that the generated WIT bindings (`wit`) stay inside `plugin` and a change to the WIT
//! contract shows up here, in one place, as a conversion that no longer compiles.

use crate::wit;

/// An HTTP request as a handler plugin sees it.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    /// Lower-case names, values as text.
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// A handler plugin's answer, before the host checks it against HTTP's rules.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// 0 means 200.
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The kinds of error a plugin may answer with (the WIT `error-code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCode {
    BadRequest,
    UnsupportedMediaType,
    NotFound,
    Internal,
    Unavailable,
}

/// An error a plugin answered with.
#[derive(Debug, Clone)]
pub struct GuestError {
    pub code: GuestCode,
    pub message: String,
}

/// What a router sees of one request (no body).
#[derive(Debug, Clone)]
pub struct RouteRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The value of the endpoint's `routing_key_header`, if the request has it.
    pub routing_key: Option<String>,
}

/// Live figures of one variant over the endpoint's window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VariantStats {
    pub in_flight: u32,
    pub queue_depth: u32,
    pub requests: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub error_rate: f64,
}

/// A variant a router may choose, with the model version it resolves to now.
#[derive(Debug, Clone)]
pub struct RouteVariant {
    pub name: String,
    pub model: String,
    pub version: u64,
    pub label: Option<String>,
    pub weight: u32,
    pub stats: VariantStats,
}

/// A router's choice.
#[derive(Debug, Clone)]
pub struct Decision {
    pub variant: String,
    pub shadows: Vec<String>,
    pub reason: Option<String>,
}

impl From<HttpRequest> for wit::Request {
    fn from(r: HttpRequest) -> Self {
        wit::Request {
            method: r.method,
            path: r.path,
            headers: r.headers,
            content_type: r.content_type,
            body: r.body,
        }
    }
}

impl From<wit::Response> for HttpResponse {
    fn from(r: wit::Response) -> Self {
        HttpResponse {
            status: r.status,
            content_type: r.content_type,
            headers: r.headers,
            body: r.body,
        }
    }
}

impl From<wit::Error> for GuestError {
    fn from(e: wit::Error) -> Self {
        let code = match e.code {
            wit::ErrorCode::BadRequest => GuestCode::BadRequest,
            wit::ErrorCode::UnsupportedMediaType => GuestCode::UnsupportedMediaType,
            wit::ErrorCode::NotFound => GuestCode::NotFound,
            wit::ErrorCode::Internal => GuestCode::Internal,
            wit::ErrorCode::Unavailable => GuestCode::Unavailable,
        };
        GuestError {
            code,
            message: e.message,
        }
    }
}

impl From<RouteRequest> for wit::router::RequestMeta {
    fn from(r: RouteRequest) -> Self {
        wit::router::RequestMeta {
            method: r.method,
            path: r.path,
            headers: r.headers,
            routing_key: r.routing_key,
        }
    }
}

impl From<RouteVariant> for wit::router::Variant {
    fn from(v: RouteVariant) -> Self {
        let s = v.stats;
        wit::router::Variant {
            name: v.name,
            model: v.model,
            version: v.version,
            label: v.label,
            weight: v.weight,
            stats: wit::router::VariantStats {
                in_flight: s.in_flight,
                queue_depth: s.queue_depth,
                requests: s.requests,
                p50_us: s.p50_us,
                p99_us: s.p99_us,
                error_rate: s.error_rate,
            },
        }
    }
}

impl From<wit::router::Decision> for Decision {
    fn from(d: wit::router::Decision) -> Self {
        Decision {
            variant: d.variant,
            shadows: d.shadows,
            reason: d.reason,
        }
    }
}
