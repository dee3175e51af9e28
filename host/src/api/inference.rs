//! Serving one inference request: resolve the name (a model, or an endpoint whose router
//! picks the variant), run the verb, count it in the metrics, and name the version that
//! answered in `x-nnserve-variant`.

use super::{v1, v2, ApiError, AppState, VARIANT_HEADER};
use crate::lifecycle::{ModelVersion, Servable};
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Copies in flight to one shadow variant past which further copies are dropped
/// (counted as `outcome="dropped"`), so a slow shadow cannot pile up memory.
const SHADOW_MAX_IN_FLIGHT: u32 = 64;

/// Counts a request to a resolved version in the metrics once it ends: with its outcome
/// when it finishes ([`Recording::finish`]), or as `cancelled` when its future is dropped
/// first (the client went away: hyper drops the handler when the connection closes).
struct Recording<'a> {
    state: &'a AppState,
    target: &'a ModelVersion,
    started: Instant,
    done: bool,
}

impl<'a> Recording<'a> {
    fn start(state: &'a AppState, target: &'a ModelVersion) -> Self {
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
            let counts = &self.target.runner.metrics().counts;
            counts.record(false, self.started.elapsed());
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
fn record<T>(state: &AppState, s: &ModelVersion, started: Instant, result: &Result<T, ApiError>) {
    let took = started.elapsed();
    s.runner.metrics().counts.record(result.is_ok(), took);
    if result.is_ok() && s.runner.metrics().request_ok(took) {
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

pub(super) async fn run_verb(
    state: &AppState,
    verb: &Verb,
    s: &ModelVersion,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !matches!(verb, Verb::Infer { .. }) && s.runner().model_less() {
        return Err(model_less(s.name()));
    }
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
) -> Result<Arc<ModelVersion>, ApiError> {
    let version_of = |name: &str| -> Result<Option<u64>, ApiError> {
        Ok(match label {
            Some(l) => Some(state.registry.label(name, l)?),
            None => version,
        })
    };
    let Ok(Servable::Endpoint(e)) = state.registry.resolve(name, None) else {
        return Ok(state.registry.resolve_model(name, version_of(name)?)?);
    };
    let e = &e.endpoint;
    if version.is_none() && label.is_none() {
        return Ok(state.registry.default_target(e)?);
    }
    let v = e.default();
    match state.registry.resolve(&v.model, version_of(&v.model)?)? {
        Servable::Model(m) => Ok(m),
        // Never follow an endpoint to another endpoint (they could name each other).
        Servable::Endpoint(_) => Err(ApiError::Unavailable(format!(
            "endpoint '{name}': its default variant '{}' names the endpoint '{}', not a model",
            v.name(),
            v.model
        ))),
    }
}

/// One inference verb with its request, as run on whichever version the name resolves
/// to (a model, an endpoint's chosen variant, each shadow): HTTP's [`HttpCall`], gRPC's
/// `ModelInfer`. Cloned for each shadow copy, so keep it cheap to clone.
pub(crate) trait Run: Clone + Send + Sync + 'static {
    type Answer: Send + 'static;
    /// Runs the request on one resolved version.
    fn run(
        &self,
        state: &AppState,
        s: &Arc<ModelVersion>,
    ) -> impl std::future::Future<Output = Result<Self::Answer, ApiError>> + Send;
    /// What an endpoint's router sees of the request, and its deadline.
    fn route_meta(&self, state: &AppState) -> Result<(crate::routing::Meta, Duration), ApiError>;
    /// Whether a successful answer still reports a server failure (a plugin's 5xx), which
    /// counts against a variant in the live stats.
    fn server_error(_answer: &Self::Answer) -> bool {
        false
    }
}

/// An HTTP inference request: the verb and what it carries.
#[derive(Clone)]
pub(crate) struct HttpCall {
    pub verb: Verb,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Run for HttpCall {
    type Answer = Response;
    async fn run(&self, state: &AppState, s: &Arc<ModelVersion>) -> Result<Response, ApiError> {
        run_verb(
            state,
            &self.verb,
            s,
            &self.method,
            &self.headers,
            self.body.clone(),
        )
        .await
    }
    fn route_meta(&self, state: &AppState) -> Result<(crate::routing::Meta, Duration), ApiError> {
        let meta = crate::routing::Meta {
            method: self.method.to_string(),
            path: self.path.clone(),
            headers: header_pairs(&self.headers),
        };
        Ok((meta, state.deadline(&self.headers)?))
    }
    fn server_error(answer: &Response) -> bool {
        answer.status().is_server_error()
    }
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
    let call = HttpCall {
        verb,
        method,
        path: path.to_string(),
        headers,
        body,
    };
    let (result, target) = serve(state, name, version, label, call).await?;
    Ok(with_variant(result, &target))
}

/// Resolves `name` (routing an endpoint's request to a variant, and sending its shadow
/// copies) and runs `call` there, counted in the metrics. Answers the result and the
/// version that served it; an error before a version was chosen is the outer `Err`.
pub(crate) async fn serve<R: Run>(
    state: &AppState,
    name: &str,
    version: Option<u64>,
    label: Option<&str>,
    call: R,
) -> Result<(Result<R::Answer, ApiError>, Arc<ModelVersion>), ApiError> {
    let explicit = version.is_some() || label.is_some();
    // One registry lookup on the common path: a model by name.
    let latest = if explicit {
        None
    } else {
        Some(state.registry.resolve(name, None)?)
    };
    let target = match latest {
        Some(Servable::Endpoint(e)) => Err(e),
        Some(Servable::Model(m)) => Ok(m),
        None => Ok(resolve_model(state, name, version, label)?),
    };
    let endpoint_version = match target {
        Err(e) => e,
        Ok(target) => {
            let recording = Recording::start(state, &target);
            let result = call.run(state, &target).await;
            recording.finish(&result);
            return Ok((result, target));
        }
    };
    let endpoint = &endpoint_version.endpoint;
    let started = Instant::now();
    let (meta, deadline) = call.route_meta(state)?;
    // The candidates: variants that resolve to an available model version now.
    let mut available = Vec::new();
    let mut missing = Vec::new();
    for v in &endpoint.variants {
        match state.registry.resolve_variant(v) {
            Ok(m) => available.push(crate::routing::Candidate {
                variant: v,
                version: m.version(),
                queue_depth: m.runner.queue_depth(),
                target: m,
            }),
            Err(e) => missing.push(format!("{}: {e}", v.name())),
        }
    }
    let routed = crate::routing::route(
        endpoint,
        available,
        missing,
        &state.routing_stats,
        &state.metrics,
        meta,
        deadline,
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
        let (state, call) = (state.clone(), call.clone());
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
            let result = call.run(&state, &target).await;
            record(&state, &target, t0, &result);
            let outcome = outcome_of(&result);
            guard.finish(is_server_error::<R>(&result));
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
    let result = call.run(state, &target).await;
    recording.finish(&result);
    guard.finish(is_server_error::<R>(&result));
    state.metrics.variant_request(
        &endpoint.name,
        &routed.variant,
        false,
        outcome_of(&result),
        started.elapsed(),
    );
    Ok((result, target))
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

pub(super) fn outcome_of<T>(result: &Result<T, ApiError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.outcome(),
    }
}

/// A 5xx, which counts against a variant in the live stats (a 4xx is the client's).
fn is_server_error<R: Run>(result: &Result<R::Answer, ApiError>) -> bool {
    match result {
        Ok(r) => R::server_error(r),
        Err(e) => e.status().is_server_error(),
    }
}

/// The answer (or the error) with `x-nnserve-variant: {model}@{version}`.
fn with_variant(result: Result<Response, ApiError>, target: &ModelVersion) -> Response {
    let mut resp = result.into_response();
    if let Ok(v) = HeaderValue::from_maybe_shared(target.id.clone()) {
        resp.headers_mut().insert(VARIANT_HEADER, v);
    }
    resp
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
/// The tensor APIs on a model-less handler bundle: only its plugin answers.
fn model_less(name: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "{name} has no model of its own (a model-less plugin bundle): send the request to its \
         plugin, POST /v1/models/{name}:infer"
    ))
}

pub(crate) async fn infer_within(
    state: &AppState,
    headers: &HeaderMap,
    runner: &crate::nn::Runner,
    inputs: Vec<(String, crate::tensor::Tensor)>,
) -> Result<Vec<(String, crate::tensor::Tensor)>, ApiError> {
    if runner.model_less() {
        return Err(model_less("{name}"));
    }
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
