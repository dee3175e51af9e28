//! What crosses between the server and a handler plugin, checked: a plugin's answer
//! (status, headers, content type) before it becomes an HTTP response, and the BYTES
//! framing that carries a request body to a plugin (and its answer back) over KServe v2.
//! Both sides are untrusted: a plugin is sandboxed code of any quality, and the BYTES
//! tensor comes from a client.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Headers that frame the HTTP message or concern one hop: the host owns them. A plugin
/// that set `content-length: 5` on a 100-byte body corrupted the next answer on a
/// keep-alive connection; these are dropped from a plugin's answer, as is `proxy-*`.
pub const HOST_OWNED_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "host",
    "date",
];

/// Whether the host owns this header (a plugin's is dropped).
pub fn host_owned(name: &HeaderName) -> bool {
    HOST_OWNED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("proxy-")
}

/// A plugin's answer made fit for HTTP: a status in 200-599 (0 is 200; 1xx would leave
/// the connection in another protocol's state), valid header names and values, the
/// headers the host owns dropped, and the content type as `content-type`. `Err` names
/// the rule broken, for a 500 that names the plugin.
pub fn answer_head(
    status: u16,
    headers: &[(String, String)],
    content_type: Option<&str>,
) -> Result<(StatusCode, HeaderMap), String> {
    let status = if status == 0 { 200 } else { status };
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("status {status}"))?;
    let mut map = HeaderMap::with_capacity(headers.len().min(64) + 1);
    for (k, v) in headers {
        let name = HeaderName::try_from(k.as_str())
            .map_err(|_| format!("the header name {}", crate::names::shown(k)))?;
        let value = HeaderValue::try_from(v.as_str())
            .map_err(|_| format!("header {name}: the value {}", crate::names::shown(v)))?;
        if !host_owned(&name) {
            map.append(name, value);
        }
    }
    if let Some(ct) = content_type {
        let value = HeaderValue::try_from(ct)
            .map_err(|_| format!("the content type {}", crate::names::shown(ct)))?;
        map.insert(http::header::CONTENT_TYPE, value);
    }
    Ok((status, map))
}

/// The elements of a BYTES tensor in the raw form: each a u32 little-endian length and
/// that many bytes.
pub fn split_bytes_elements(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or("a BYTES element's 4-byte length prefix is cut short")?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(format!(
                "a BYTES element declares {len} bytes but only {} follow",
                tail.len()
            ));
        }
        out.push(&tail[..len]);
        rest = &tail[len..];
    }
    Ok(out)
}

/// One element as a raw BYTES tensor.
pub fn bytes_element(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_round_trip_and_refuse_cut_data() {
        let mut raw = bytes_element(b"abc");
        raw.extend(bytes_element(b""));
        assert_eq!(
            split_bytes_elements(&raw).unwrap(),
            vec![&b"abc"[..], &b""[..]]
        );
        assert!(split_bytes_elements(&raw[..5]).is_err());
        assert!(split_bytes_elements(&[1, 0]).is_err());
    }

    #[test]
    fn an_answer_keeps_its_headers_but_not_the_hosts() {
        let h = |k: &str, v: &str| (k.to_string(), v.to_string());
        let (status, map) = answer_head(
            0,
            &[h("x-a", "1"), h("Content-Length", "5"), h("proxy-x", "y")],
            Some("text/plain"),
        )
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(map.len(), 2);
        assert_eq!(map["x-a"], "1");
        assert_eq!(map["content-type"], "text/plain");
        assert!(answer_head(101, &[], None).unwrap_err().contains("101"));
        assert!(answer_head(200, &[h("bad name", "v")], None).is_err());
        assert!(answer_head(200, &[h("x", "a\nb")], None).is_err());
    }
}
