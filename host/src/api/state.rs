//! What every handler shares: the state, the request deadline, the JSON parsing budget
//! and the admin token's digest.

use super::ApiError;
use crate::lifecycle::Registry;
use axum::http::HeaderMap;
use std::sync::Arc;
use std::time::Duration;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub manager: Arc<crate::lifecycle::Manager>,
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
    /// Readiness and draining.
    pub probe: Arc<super::Probe>,
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

impl AppState {
    /// The deadline for this request: the server's, or the client's if lower.
    pub(crate) fn deadline(&self, headers: &HeaderMap) -> Result<Duration, ApiError> {
        use super::TIMEOUT_HEADER;
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

    pub(super) fn matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        TokenDigest::of(given).0.ct_eq(&self.0).into()
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
}
