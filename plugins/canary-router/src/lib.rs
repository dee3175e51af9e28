//! `canary-router`: sends a share of traffic to the variant labelled `canary` and stops
//! while the canary does worse than `stable`.
//!
//! Each request goes to the canary with probability `percent`/100 (sticky per routing
//! key when the endpoint has one), unless the canary is unhealthy in the live stats of
//! the endpoint's window, compared with the stable variant:
//! - its error rate exceeds stable's by more than `max_error_rate_delta`, or
//! - its p99 exceeds `max_p99_ratio` times stable's p99.
//!
//! The canary is judged only once it has `min_requests` answers in the window. While it
//! is cut off it gets no traffic, so its window empties and it is tried again after one
//! window: a canary that still fails is cut off again after `min_requests` answers; one
//! that recovered stays in.
//!
//! Config (`[router] config`, all optional): `percent` (10), `canary_label` ("canary"),
//! `stable_label` ("stable"), `max_error_rate_delta` (0.05), `max_p99_ratio` (2.0),
//! `min_requests` (20). Variants are told apart by their `label` in the endpoint bundle;
//! without a variant of each label, the first variant serves.

use nnserve_router_sdk::{
    export_router, hash_point, host, random_f64, stable_hash, Decision, RequestMeta, Router,
    Variant,
};

struct Canary;

fn with_label<'a>(variants: &'a [Variant], label: &str) -> Option<&'a Variant> {
    variants.iter().find(|v| v.label.as_deref() == Some(label))
}

/// Why the canary is unhealthy, if it is.
fn unhealthy(canary: &Variant, stable: &Variant) -> Option<String> {
    let min_requests: u64 = host::config_or("min_requests", 20);
    let max_error_delta: f64 = host::config_or("max_error_rate_delta", 0.05);
    let max_p99_ratio: f64 = host::config_or("max_p99_ratio", 2.0);
    let (c, s) = (&canary.stats, &stable.stats);
    if c.requests < min_requests {
        return None;
    }
    if c.error_rate > s.error_rate + max_error_delta {
        return Some(format!(
            "canary error rate {:.3} > stable {:.3} + {max_error_delta}",
            c.error_rate, s.error_rate
        ));
    }
    if s.p99_us > 0 && c.p99_us as f64 > max_p99_ratio * s.p99_us as f64 {
        return Some(format!(
            "canary p99 {} us > {max_p99_ratio} x stable p99 {} us",
            c.p99_us, s.p99_us
        ));
    }
    None
}

impl Router for Canary {
    fn route(meta: RequestMeta, variants: Vec<Variant>) -> Decision {
        let canary_label = host::config("canary_label").unwrap_or_else(|| "canary".into());
        let stable_label = host::config("stable_label").unwrap_or_else(|| "stable".into());
        let percent: f64 = host::config_or("percent", 10.0);
        let (Some(canary), Some(stable)) = (
            with_label(&variants, &canary_label),
            with_label(&variants, &stable_label),
        ) else {
            return Decision::to(&variants[0].name).because(format!(
                "no variant labelled both '{canary_label}' and '{stable_label}' is available"
            ));
        };
        if let Some(why) = unhealthy(canary, stable) {
            return Decision::to(&stable.name).because(format!("canary cut off: {why}"));
        }
        let point = match &meta.routing_key {
            Some(key) => hash_point(stable_hash(key)),
            None => random_f64(),
        };
        if point * 100.0 < percent {
            Decision::to(&canary.name).because(format!("canary share {percent}%"))
        } else {
            Decision::to(&stable.name).because(format!("stable share {}%", 100.0 - percent))
        }
    }
}

export_router!(Canary);
