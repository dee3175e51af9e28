//! A test router that misbehaves when asked to: the request header `x-router-mode` (or
//! the config key `mode`) set to `trap` panics, `loop` spins until the host's CPU budget
//! stops it, `unknown` names a variant that does not exist; otherwise it routes to the
//! variant named by the header `x-route-to`, or to the last variant.
use nnserve_router_sdk::{export_router, host, Decision, RequestMeta, Router, Variant};

struct Misbehave;

fn header<'a>(meta: &'a RequestMeta, name: &str) -> Option<&'a str> {
    meta.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl Router for Misbehave {
    fn route(meta: RequestMeta, variants: Vec<Variant>) -> Decision {
        let mode = header(&meta, "x-router-mode")
            .map(str::to_string)
            .or_else(|| host::config("mode"));
        match mode.as_deref() {
            Some("trap") => panic!("misbehave-router: trapping on purpose"),
            Some("loop") => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Some("unknown") => Decision::to("no-such-variant"),
            _ => match header(&meta, "x-route-to") {
                Some(name) => Decision::to(name),
                None => Decision::to(&variants[variants.len() - 1].name),
            },
        }
    }
}

export_router!(Misbehave);
