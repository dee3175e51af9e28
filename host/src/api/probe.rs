//! Liveness and readiness, as an orchestrator probes them (`/v2/health/live`,
//! `/v2/health/ready`, gRPC `ServerLive`/`ServerReady` and `grpc.health.v1`'s service
//! `""`).
//!
//! Live: always, from the moment the listener opens (before any model loads); a process
//! that cannot answer is not live. Ready: once the start-up load has finished and the
//! `readiness` rule holds, and never again once draining has begun:
//! - `all` (the default, Triton's strict readiness): every version the start-up load
//!   tried is available. A version that failed keeps the server unready until its
//!   model has a version available again (a fixed one uploaded or copied in), so a bad
//!   rollout never takes traffic.
//! - `any`: a version of any model is available (the rest may still be loading, or
//!   have failed).
//!
//! Once ready, the server stays ready (a model's own readiness is its ready route)
//! until a SIGTERM starts the drain.

use crate::config::Readiness;
use crate::lifecycle::Registry;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

pub struct Probe {
    rule: Readiness,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Set when the start-up load has finished: the models whose load failed in it.
    failed: Mutex<Option<BTreeSet<String>>>,
}

impl Probe {
    pub fn new(rule: Readiness) -> Probe {
        Probe {
            rule,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            failed: Mutex::new(None),
        }
    }

    /// The start-up load has finished; `failed` names the models with a version that
    /// failed in it.
    pub fn loaded(&self, failed: BTreeSet<String>, registry: &Registry) {
        *self.failed.lock().unwrap() = Some(failed);
        self.is_ready(registry);
        registry.touch();
    }

    /// Ready now (see the module's doc); the rule is looked at only until it first holds.
    pub fn is_ready(&self, registry: &Registry) -> bool {
        if self.draining.load(Ordering::Acquire) {
            return false;
        }
        if self.ready.load(Ordering::Acquire) {
            return true;
        }
        let holds = match self.rule {
            // Also while the start-up load goes on.
            Readiness::Any => registry
                .model_names()
                .iter()
                .any(|m| !registry.available_versions(m).is_empty()),
            Readiness::All => match &mut *self.failed.lock().unwrap() {
                None => false,
                Some(failed) => {
                    failed.retain(|m| registry.available_versions(m).is_empty());
                    failed.is_empty()
                }
            },
        };
        if holds {
            self.ready.store(true, Ordering::Release);
            tracing::info!("ready: /v2/health/ready answers 200");
        }
        holds
    }

    /// SIGTERM: unready from now on, for good.
    pub fn drain(&self, registry: &Registry) {
        self.draining.store(true, Ordering::Release);
        registry.touch();
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unready_until_loaded_and_for_good_once_draining() {
        let registry = Registry::new(
            std::sync::Arc::new(crate::metrics::Metrics::new()),
            crate::lifecycle::DeviceBudget::new(&Default::default()),
        );
        // `any` over an empty registry: nothing serves, so not ready.
        let any = Probe::new(Readiness::Any);
        any.loaded(BTreeSet::new(), &registry);
        assert!(!any.is_ready(&registry));
        let p = Probe::new(Readiness::All);
        assert!(!p.is_ready(&registry), "not before the start-up load");
        // `all` with a model whose load failed: not ready while it has no version.
        p.loaded(["bad".to_string()].into(), &registry);
        assert!(!p.is_ready(&registry));
        p.loaded(BTreeSet::new(), &registry);
        assert!(p.is_ready(&registry));
        p.drain(&registry);
        assert!(!p.is_ready(&registry) && p.draining());
    }
}
