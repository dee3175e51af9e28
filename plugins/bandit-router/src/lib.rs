//! `bandit-router`: an epsilon-greedy bandit over the variants, using the live stats as
//! its memory: mostly the variant that does best in the window, sometimes another.
//!
//! - A variant with fewer than `min_requests` answers in the window is explored first,
//!   so every variant is measured (and measured again once its figures age out).
//! - Otherwise, with probability `epsilon` a variant is drawn at random (exploration);
//!   else the best by the objective serves (exploitation).
//! - `objective = "latency"` (default): the lowest p50; `"errors"`: the lowest error
//!   rate, ties broken by p50.
//!
//! No static weight split can express this: the traffic follows what the variants do
//! now. Config (`[router] config`, all optional): `epsilon` (0.1), `objective`
//! ("latency"), `min_requests` (10). Weights of 0 exclude a variant.

use nnserve_router_sdk::{export_router, host, random_f64, Decision, RequestMeta, Router, Variant};

struct Bandit;

impl Router for Bandit {
    fn route(_meta: RequestMeta, variants: Vec<Variant>) -> Decision {
        let epsilon: f64 = host::config_or("epsilon", 0.1);
        let min_requests: u64 = host::config_or("min_requests", 10);
        let by_errors = host::config("objective").as_deref() == Some("errors");
        let live: Vec<&Variant> = variants.iter().filter(|v| v.weight > 0).collect();
        let live = if live.is_empty() {
            variants.iter().collect()
        } else {
            live
        };
        if let Some(v) = live.iter().min_by_key(|v| v.stats.requests) {
            if v.stats.requests < min_requests {
                return Decision::to(&v.name).because(format!(
                    "explore: {} answers in the window, fewer than {min_requests}",
                    v.stats.requests
                ));
            }
        }
        if random_f64() < epsilon {
            let i = ((random_f64() * live.len() as f64) as usize).min(live.len() - 1);
            return Decision::to(&live[i].name).because(format!("explore (epsilon {epsilon})"));
        }
        let key = |v: &&&Variant| {
            let err = if by_errors {
                (v.stats.error_rate * 1e6) as u64
            } else {
                0
            };
            (err, v.stats.p50_us)
        };
        let best = live.iter().min_by_key(key).expect("at least one variant");
        Decision::to(&best.name).because(format!(
            "exploit: p50 {} us, error rate {:.3}",
            best.stats.p50_us, best.stats.error_rate
        ))
    }
}

export_router!(Bandit);
