//! Names and numbers that come from outside (URLs, manifests, directory names, archive
//! entries), the one rule they follow, and how untrusted text is shown back.
//!
//! Every model, endpoint, variant and label name and every version number that reaches
//! the registry or a path in the repository has passed [`check_name`] or
//! [`parse_version`]; `repository` builds its paths only from names that pass them.
//! Error messages show untrusted text through [`shown`], which bounds it.

/// The naming rule, as error messages state it.
pub const NAME_RULE: &str =
    "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters";

/// The longest name.
pub const MAX_NAME_LEN: usize = 128;

/// The highest version number: TF Serving and Triton keep versions as int64, so a higher
/// one could not be named by their clients (and 2^64-1 would leave no room for a newer).
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// Does `name` follow the naming rule? `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 bytes:
/// never `.`, `..`, a leading dot, a separator (`/`, `\`), NUL or a control character,
/// so a valid name is always exactly one plain path component. Upper case is allowed:
/// TF Serving and Triton names such as `ResNet50` are common.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// `Ok` for a valid name, else why not, naming `what` (e.g. "model name").
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} {} is not valid: use {NAME_RULE}",
            shown(name)
        ))
    }
}

/// Checks a version number read as a number (from a manifest or a JSON body).
pub fn check_version(v: u64) -> Result<u64, String> {
    if v == 0 || v > MAX_VERSION {
        Err(format!(
            "version {v} is out of range: versions are whole numbers from 1 to {MAX_VERSION}"
        ))
    } else {
        Ok(v)
    }
}

/// Parses a version from text (a URL segment or a directory name): digits only, no
/// leading zero, from 1 to [`MAX_VERSION`].
pub fn parse_version(text: &str) -> Result<u64, String> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || text.starts_with('0') {
        return Err(format!(
            "version {} is not a version number (a whole number from 1 to {MAX_VERSION})",
            shown(text)
        ));
    }
    match text.parse::<u64>() {
        Ok(v) => check_version(v),
        Err(_) => Err(format!(
            "version {} is out of range: versions are whole numbers from 1 to {MAX_VERSION}",
            shown(text)
        )),
    }
}

/// Untrusted text as an error message may show it: quoted, control characters escaped,
/// and past [`SHOWN_CHARS`] characters cut, with its length, so that an answer or a log
/// line never grows with the input.
pub fn shown(text: &str) -> String {
    format!("\"{}\"", cut(text, true))
}

/// [`shown`] without the quotes (for text already set off, as in `` `name` ``).
pub fn bounded(text: &str) -> String {
    cut(text, false)
}

fn cut(text: &str, quoted: bool) -> String {
    let mut out = String::with_capacity(text.len().min(SHOWN_CHARS) + 24);
    for (i, c) in text.chars().enumerate() {
        if i == SHOWN_CHARS {
            out.push_str(&format!("… ({} bytes)", text.len()));
            return out;
        }
        if quoted && c == '"' {
            out.push_str("\\\"");
        } else {
            push_escaped(&mut out, c);
        }
    }
    out
}

/// A list from a request (a shape) as an error message may show it: its first 8 items,
/// then how many there are.
pub fn shown_list<T: std::fmt::Debug>(items: &[T]) -> String {
    if items.len() <= 8 {
        format!("{items:?}")
    } else {
        let head: Vec<String> = items[..8].iter().map(|i| format!("{i:?}")).collect();
        format!("[{}, … ({} items)]", head.join(", "), items.len())
    }
}

/// How many characters of untrusted text [`shown`] keeps.
pub const SHOWN_CHARS: usize = 80;

/// Text for one log line: control characters (newlines among them, which would forge
/// a line) escaped, and cut past `max` bytes with the length.
pub fn log_safe(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 24);
    for c in text.chars() {
        if out.len() >= max {
            out.push_str(&format!("… ({} bytes)", text.len()));
            return out;
        }
        push_escaped(&mut out, c);
    }
    out
}

/// The public form of an internal error (a failed load's, for the status routes and for
/// inference callers): without libtorch's "Exception raised from" trailer, stack frames
/// and load addresses, on one line, with absolute file paths cut to their last
/// component, at most [`PUBLIC_REASON_CHARS`] characters. The full error goes to the
/// log and to authenticated management answers.
pub fn public_reason(full: &str) -> String {
    // Everything from the first trace marker on is internals: libtorch's C++ trace and
    // stack frames (with load addresses), a Rust backtrace.
    let end = TRACE_MARKERS
        .iter()
        .filter_map(|m| full.find(m))
        .min()
        .unwrap_or(full.len());
    let kept = &full[..end];
    let mut out = String::new();
    for word in kept.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&without_path(word));
    }
    let cut = end < full.trim_end().len() || out.contains('…');
    let mut out = log_safe(&out, PUBLIC_REASON_CHARS);
    if cut || out.len() > PUBLIC_REASON_CHARS {
        out.push_str(" (the full error is in the server log)");
    }
    out
}

/// Where internals begin in an error's text.
const TRACE_MARKERS: &[&str] = &[
    "Exception raised from",
    "frame #",
    "stack backtrace:",
    "Stack backtrace:",
];

/// How long the public form of an error may be.
pub const PUBLIC_REASON_CHARS: usize = 1024;

/// A word with an absolute path in it (`/srv/repo/m/1/model/model.pt`, also quoted or
/// after `=`) cut to `…/model.pt`; API routes (`/v1/...`, `/v2/...`) are kept.
fn without_path(word: &str) -> std::borrow::Cow<'_, str> {
    let starts = |i: usize| {
        word[i..].starts_with('/')
            && (i == 0 || "'\"`([=:<".contains(word[..i].chars().next_back().unwrap_or(' ')))
            && word[i + 1..].contains('/')
            && !word[i..].starts_with("/v1/")
            && !word[i..].starts_with("/v2/")
    };
    let Some(at) = (0..word.len()).find(|&i| word.is_char_boundary(i) && starts(i)) else {
        return word.into();
    };
    let end = word[at..]
        .find(|c: char| "'\"`),;]>".contains(c))
        .map_or(word.len(), |e| at + e);
    let path = &word[at..end];
    let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    format!("{}…/{last}{}", &word[..at], &word[end..]).into()
}

fn push_escaped(out: &mut String, c: char) {
    if c.is_control() {
        out.extend(c.escape_default());
    } else {
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_plain_path_component() {
        for ok in [
            "resnet18",
            "ResNet50",
            "a.b-c_d",
            "7",
            "x".repeat(128).as_str(),
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-a",
            "_a",
            "a/b",
            "a\\b",
            "a\0b",
            "a\nb",
            "a b",
            "é",
            "x".repeat(129).as_str(),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn versions_are_int64_and_positive() {
        assert_eq!(parse_version("1"), Ok(1));
        assert_eq!(parse_version("9223372036854775807"), Ok(MAX_VERSION));
        for bad in [
            "0",
            "01",
            "-1",
            "+1",
            "",
            "x",
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999999",
        ] {
            assert!(parse_version(bad).is_err(), "{bad}");
        }
        assert!(check_version(MAX_VERSION + 1).is_err());
        assert!(check_version(0).is_err());
    }

    #[test]
    fn public_reasons_carry_no_internals() {
        let torch = "the bundle does not load: loading /srv/nnserve/repo/m/1/model/model.pt: \
            PytorchStreamReader failed reading zip archive: failed finding central directory\n\
            Exception raised from valid at /pytorch/caffe2/serialize/inline_container.cc:236 \
            (most recent call first):\nframe #0: c10::Error::Error(c10::SourceLocation) + 0x9c \
            (0x7f3a2c0d1e5c in /work/.venv/lib/python3.11/site-packages/torch/lib/libc10.so)";
        let p = public_reason(torch);
        assert!(
            p.starts_with(
                "the bundle does not load: loading …/model.pt: PytorchStreamReader failed"
            ),
            "{p}"
        );
        for internal in [
            "/srv",
            "0x7f",
            "frame #",
            "libc10",
            "Exception raised",
            "/work",
        ] {
            assert!(!p.contains(internal), "{internal} in {p}");
        }
        assert!(p.ends_with("(the full error is in the server log)"), "{p}");
        let same = "warm-up 00.json to /v1/models/warm:infer answered 500";
        assert_eq!(public_reason(same), same);
        assert!(public_reason(&"x".repeat(10_000)).len() < 1100);
        assert_eq!(
            public_reason("cannot open '/a/b/c.pt'"),
            "cannot open '…/c.pt' (the full error is in the server log)"
        );
    }

    #[test]
    fn untrusted_text_is_bounded_and_escaped() {
        let long = "a".repeat(65_000);
        let s = shown(&long);
        assert!(s.len() < 120 && s.contains("(65000 bytes)"), "{s}");
        assert_eq!(shown("a\nb\"c"), r#""a\nb\"c""#);
        assert_eq!(log_safe("line\nforged INFO x", 100), "line\\nforged INFO x");
        assert!(log_safe(&long, 100).len() < 130);
    }
}
