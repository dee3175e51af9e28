//! `x-request-id`: the client's (when it is a sane token) or a fresh one, echoed on the
//! answer and carried by every log line of the request (a `request` span with field
//! `request_id`). Used by HTTP and gRPC (where it is metadata) alike.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tracing::Instrument;

pub const HEADER: &str = "x-request-id";

/// The longest client id kept; a longer or odd one is replaced, never echoed.
const MAX_LEN: usize = 128;

/// A client's id is kept when it is 1 to 128 of `A-Z a-z 0-9 - _ . : / + =` (UUIDs,
/// ULIDs, base64 and trace ids are); anything else could forge log lines or headers.
pub fn acceptable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b))
}

/// A fresh id: this process's random 64 bits and a counter, unique without a lock.
pub fn fresh() -> HeaderValue {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("{process:016x}-{n:08x}")).expect("hex is a header value")
}

/// The layer: runs the request inside its span and puts the id on the answer.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(HEADER) {
        Some(v) if acceptable(v.as_bytes()) => v.clone(),
        _ => {
            let id = fresh();
            req.headers_mut().insert(HEADER, id.clone());
            id
        }
    };
    let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or_default());
    let mut resp = next.run(req).instrument(span).await;
    resp.headers_mut().insert(HEADER, id);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_ids_are_kept_and_odd_ones_replaced() {
        assert!(acceptable(b"3f2c1a9e-7b7d-4c43-9d0e-2b8b8f0d3c11"));
        assert!(acceptable(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for odd in [&b""[..], b"a b", b"x\r\ny: z", b"\"}", &[b'a'; 129][..]] {
            assert!(!acceptable(odd), "{odd:?}");
        }
        let (a, b) = (fresh(), fresh());
        assert_ne!(a, b);
        assert!(acceptable(a.as_bytes()));
    }
}
