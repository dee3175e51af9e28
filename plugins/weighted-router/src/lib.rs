//! `weighted-router`: splits an endpoint's traffic by the variants' weights.
//!
//! - With a routing key (the endpoint's `routing_key_header`, e.g. `x-user-id`), the
//!   pick is sticky: a stable hash of the key chooses the point in the weight line, so
//!   the same key lands on the same variant for as long as the weights (and the set of
//!   available variants) stay the same.
//! - Without a key, each request draws a random point: the split follows the weights.
//!
//! Config (`[router] config`, all optional):
//! - `shadow`: the name of a variant that gets a copy of every request (its answers are
//!   recorded in the metrics, never returned), e.g. to try a new model on live traffic.

use nnserve_router_sdk::{
    export_router, hash_point, host, pick_weighted, random_f64, stable_hash, Decision, RequestMeta,
    Router, Variant,
};

struct Weighted;

impl Router for Weighted {
    fn route(meta: RequestMeta, variants: Vec<Variant>) -> Decision {
        let (point, how) = match &meta.routing_key {
            Some(key) => (hash_point(stable_hash(key)), "sticky key"),
            None => (random_f64(), "random draw"),
        };
        let chosen = pick_weighted(&variants, point)
            // Every weight is 0: the first variant serves.
            .unwrap_or(&variants[0]);
        let mut decision = Decision::to(&chosen.name).because(format!(
            "{how} at {point:.4} of weights {}",
            variants
                .iter()
                .map(|v| format!("{}={}", v.name, v.weight))
                .collect::<Vec<_>>()
                .join(",")
        ));
        if let Some(shadow) = host::config("shadow") {
            if shadow != chosen.name && variants.iter().any(|v| v.name == shadow) {
                decision = decision.with_shadows([shadow]);
            }
        }
        decision
    }
}

export_router!(Weighted);
