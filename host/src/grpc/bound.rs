//! The layer around every gRPC call: a bound on its whole time, and tonic's refusal of an
//! oversized message answered as Triton answers it. A plain tower layer (not axum's
//! `from_fn`, which clones the router and boxes twice per call: measured on the request
//! path, bench/README.md session 10).

use crate::metrics::Metrics;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Status;

#[derive(Clone)]
pub struct BoundLayer {
    /// The most a call may take, its body's arrival included.
    pub bound: Duration,
    pub max_request: usize,
    pub metrics: Arc<Metrics>,
}

impl<S> tower_layer::Layer<S> for BoundLayer {
    type Service = Bound<S>;
    fn layer(&self, inner: S) -> Bound<S> {
        Bound {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Bound<S> {
    inner: S,
    layer: BoundLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req, B> tower_service::Service<Req> for Bound<S>
where
    S: tower_service::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let call = self.inner.call(req);
        let layer = self.layer.clone();
        Box::pin(async move {
            match tokio::time::timeout(layer.bound, call).await {
                Ok(Ok(resp)) => Ok(too_large_as_triton(resp, &layer)),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    layer.metrics.api_request("grpc", "timeout");
                    Ok(Status::deadline_exceeded(format!(
                        "the call took over {} ms (request_timeout_ms plus body_read_timeout_ms): \
                         its body came too slowly or its work did not end",
                        layer.bound.as_millis()
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// tonic refuses a request message over the limit with OUT_OF_RANGE; gRPC's own servers
/// (Triton's) answer RESOURCE_EXHAUSTED, which clients treat as "too large, do not
/// retry as is". The answer says so with the HTTP API's words.
fn too_large_as_triton<B>(mut resp: http::Response<B>, layer: &BoundLayer) -> http::Response<B> {
    let h = resp.headers();
    if h.get("grpc-status").is_none_or(|v| v != "11") {
        return resp; // the common case: no status in the head (it comes in the trailers)
    }
    // grpc-message is percent-encoded (spaces as %20).
    let too_large = h.get("grpc-message").is_some_and(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .replace("%20", " ")
            .starts_with("Error, decoded message length too large")
    });
    if too_large {
        let status = Status::resource_exhausted(format!(
            "the request message is over {} bytes (max_request_bytes)",
            layer.max_request
        ));
        layer.metrics.api_request("grpc", "client_error");
        let h = resp.headers_mut();
        h.remove("grpc-message");
        let _ = status.add_header(h);
    }
    resp
}
