//! The nnserve router SDK: pick the variant of an endpoint that serves each request.
//!
//! An endpoint bundle (`[endpoint]`, `[[variants]]`, `[router]`) names model variants
//! and a router plugin. For every request to the endpoint, nnserve calls the router with
//! the request's metadata and the variants that are available now, each with its weight
//! and live stats; the router answers with a [`Decision`].
//!
//! ```no_run
//! use nnserve_router_sdk::{export_router, Decision, RequestMeta, Router, Variant};
//!
//! struct First;
//!
//! impl Router for First {
//!     fn route(_meta: RequestMeta, variants: Vec<Variant>) -> Decision {
//!         Decision::to(&variants[0].name)
//!     }
//! }
//!
//! export_router!(First);
//! # fn main() {}
//! ```
//!
//! The host reuses instances between calls, but which one serves a call is not defined:
//! a router must not rely on state between requests (the live stats are its memory).
//! [`random_f64`] and [`stable_hash`] cover the usual needs of a policy.
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the
//! component to put at the `[router] path` of the endpoint bundle.

#![deny(missing_docs)]

#[allow(missing_docs)] // generated; the WIT's own comments are its docs
pub mod bindings {
    //! The generated bindings of the `nnserve:plugin/router` world. Router code should
    //! not need these; they are public for the export macro.
    wit_bindgen::generate!({
        world: "router",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_router_world",
        default_bindings_module: "nnserve_router_sdk::bindings",
    });
}

pub use crate::bindings::nnserve::plugin::routing::{Decision, RequestMeta, Variant, VariantStats};

/// The one trait a router plugin implements.
pub trait Router {
    /// Picks the variant for one request. `variants` is never empty: the host answers
    /// on its own when no variant is available. Naming a variant that is not in the
    /// list, or trapping, is a router error: the endpoint's `on_router_error` decides.
    fn route(meta: RequestMeta, variants: Vec<Variant>) -> Decision;
}

impl Decision {
    /// Sends the request to `variant`, with no shadow and no reason.
    pub fn to(variant: &str) -> Decision {
        Decision {
            variant: variant.to_string(),
            shadows: Vec::new(),
            reason: None,
        }
    }

    /// Adds a reason (shown in the server's debug log).
    pub fn because(mut self, reason: impl Into<String>) -> Decision {
        self.reason = Some(reason.into());
        self
    }

    /// Adds variants that get a copy of the request; their answers are only recorded.
    pub fn with_shadows(mut self, shadows: impl IntoIterator<Item = String>) -> Decision {
        self.shadows.extend(shadows);
        self
    }
}

/// The router's configuration and log (the `[router] config` table of the bundle).
pub mod host {
    use crate::bindings::nnserve::plugin::host as raw;
    pub use raw::LogLevel;

    /// Writes a line to the server's log, tagged with this plugin.
    pub fn log(level: LogLevel, message: &str) {
        raw::log(level, message)
    }

    /// A value of the manifest's `[router] config` table, if set.
    pub fn config(key: &str) -> Option<String> {
        raw::config(key)
    }

    /// A config value parsed as `T`; `default` when absent or when it does not parse
    /// (a router must answer, so a bad value is logged, not fatal).
    pub fn config_or<T: std::str::FromStr>(key: &str, default: T) -> T {
        match raw::config(key) {
            None => default,
            Some(v) => match v.trim().parse() {
                Ok(x) => x,
                Err(_) => {
                    raw::log(
                        LogLevel::Warn,
                        &format!(
                            "[router] config `{key}` = {v:?} does not parse; using the default"
                        ),
                    );
                    default
                }
            },
        }
    }
}

/// A uniform random number in `[0, 1)`. Each call draws a fresh seed from the host
/// (std's `RandomState`, which reads `wasi:random`), so calls are independent.
pub fn random_f64() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A stable 64-bit hash (FNV-1a) of a routing key: the same key gives the same value in
/// every instance, every version of the plugin and every server, unlike std's `HashMap`
/// hasher, which is seeded at random.
pub fn stable_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are weak for short keys; finish with a mixer (splitmix64's).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Picks by weight: `point` in `[0, 1)` falls into one variant's share of the total
/// weight. Variants of weight 0 are never picked; `None` when all weights are 0.
pub fn pick_weighted(variants: &[Variant], point: f64) -> Option<&Variant> {
    let total: u64 = variants.iter().map(|v| v.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let target = (point.clamp(0.0, 1.0 - f64::EPSILON) * total as f64) as u64;
    let mut acc = 0u64;
    for v in variants {
        acc += v.weight as u64;
        if target < acc {
            return Some(v);
        }
    }
    variants.iter().rev().find(|v| v.weight > 0)
}

/// Maps a hash to `[0, 1)`, for sticky weighted picks.
pub fn hash_point(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// Reports a panic to the host before the router traps (the log gets its message and
/// location); [`export_router!`] installs it.
#[doc(hidden)]
pub fn __install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info
                .payload_as_str()
                .unwrap_or("a panic whose payload is not text");
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            bindings::nnserve::plugin::host::panicked(message, location.as_deref());
        }))
    });
}

/// Exports a [`Router`] implementation as the plugin's `route` function.
#[macro_export]
macro_rules! export_router {
    ($t:ty) => {
        const _: () = {
            struct __NnserveRouterExport;
            impl $crate::bindings::Guest for __NnserveRouterExport {
                fn route(
                    meta: $crate::RequestMeta,
                    variants: ::std::vec::Vec<$crate::Variant>,
                ) -> $crate::Decision {
                    $crate::__install_panic_hook();
                    <$t as $crate::Router>::route(meta, variants)
                }
            }
            $crate::bindings::__export_router_world!(__NnserveRouterExport);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(name: &str, weight: u32) -> Variant {
        Variant {
            name: name.into(),
            model: name.into(),
            version: 1,
            label: None,
            weight,
            stats: VariantStats {
                in_flight: 0,
                queue_depth: 0,
                requests: 0,
                p50_us: 0,
                p99_us: 0,
                error_rate: 0.0,
            },
        }
    }

    #[test]
    fn weighted_picks_follow_the_weights() {
        let vs = [variant("a", 90), variant("zero", 0), variant("b", 10)];
        let n = 10_000;
        let b = (0..n)
            .filter(|i| {
                pick_weighted(&vs, (*i as f64 + 0.5) / n as f64)
                    .unwrap()
                    .name
                    == "b"
            })
            .count();
        assert_eq!(b, 1000);
        assert!((0..n).all(|i| pick_weighted(&vs, i as f64 / n as f64).unwrap().name != "zero"));
        assert!(pick_weighted(&[variant("a", 0)], 0.5).is_none());
        assert_eq!(pick_weighted(&vs, 1.0).unwrap().name, "b");
    }

    #[test]
    fn stable_hashes_are_fixed_and_spread() {
        // Fixed values: a key must land on the same variant in every build and server.
        // (The value is FNV-1a then splitmix64's finaliser, computed independently.)
        assert_eq!(stable_hash("user-1"), 0xc499_b5f8_a721_df58);
        let points: Vec<f64> = (0..1000)
            .map(|i| hash_point(stable_hash(&format!("user-{i}"))))
            .collect();
        let low = points.iter().filter(|&&p| p < 0.1).count();
        assert!((60..=140).contains(&low), "{low} of 1000 keys below 0.1");
        assert!(points.iter().all(|&p| (0.0..1.0).contains(&p)));
    }
}
