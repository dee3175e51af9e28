//! Warm-up requests: a version's `warmup/*.json` replayed through the same handlers
//! clients reach, before the version is published.

use super::{v1, v2, AppState};
use crate::lifecycle::ModelVersion;
use axum::http::{HeaderMap, HeaderValue};
use std::sync::Arc;

/// The hook that replays a version's `warmup/*.json` through the same handlers clients
/// reach, against that version (not yet published). Any answer but 2xx fails the load.
pub fn warmup_hook(state: AppState) -> crate::lifecycle::WarmupHook {
    Arc::new(move |servable: Arc<ModelVersion>| {
        let state = state.clone();
        Box::pin(async move {
            // (An endpoint has no model of its own to warm; its router was compiled.)
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
