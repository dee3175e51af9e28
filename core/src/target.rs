//! TF Serving's REST paths: `/v1/models/{name}[/versions/{n}|/labels/{label}][:verb|/metadata]`.
//! The verb follows a colon in the last segment, which a router cannot match, so the
//! rest of the path after `/v1/models/` is parsed here. A name, version or label from the
//! URL is checked before anything else sees it (`names`).

use crate::names;

/// A parsed `/v1/models/{rest}` path.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub model: String,
    pub version: Option<u64>,
    pub label: Option<String>,
    /// `metadata` as a trailing segment.
    pub metadata: bool,
    /// The verb after `:` (`predict`, `infer`, ...), unchecked: the caller knows its verbs.
    pub verb: Option<String>,
}

/// Why a path is not a target: a name, version or label that breaks the rules (400), or
/// a path of no known shape (404). Messages show the untrusted text bounded.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteError {
    BadRequest(String),
    NotFound(String),
}

/// Parses the path after `/v1/models/`.
pub fn parse_target(rest: &str) -> Result<Target, RouteError> {
    let (path, verb) = match rest.rsplit_once(':') {
        Some((p, v)) if !v.contains('/') => (p, Some(v.to_string())),
        _ => (rest, None),
    };
    let segs: Vec<&str> = path.split('/').collect();
    let bad = || {
        RouteError::NotFound(format!(
            "no route for /v1/models/{}; expected /v1/models/{{name}}[/versions/{{n}}|/labels/{{label}}][:predict|:infer|/metadata]",
            names::shown(rest)
        ))
    };
    names::check_name("model name", segs[0]).map_err(RouteError::BadRequest)?;
    let mut t = Target {
        model: segs[0].to_string(),
        version: None,
        label: None,
        metadata: false,
        verb,
    };
    let mut i = 1;
    match segs.get(i) {
        Some(&"versions") => {
            let v = segs.get(i + 1).ok_or_else(bad)?;
            t.version = Some(names::parse_version(v).map_err(RouteError::BadRequest)?);
            i += 2;
        }
        Some(&"labels") => {
            let label = segs.get(i + 1).ok_or_else(bad)?;
            names::check_name("label", label).map_err(RouteError::BadRequest)?;
            t.label = Some(label.to_string());
            i += 2;
        }
        _ => {}
    }
    if segs.get(i) == Some(&"metadata") {
        t.metadata = true;
        i += 1;
    }
    if i != segs.len() || (t.metadata && t.verb.is_some()) {
        return Err(bad());
    }
    Ok(t)
}

impl Target {
    /// The path this target was parsed from, in its one canonical spelling.
    pub fn path(&self) -> String {
        let mut p = self.model.clone();
        if let Some(v) = self.version {
            p += &format!("/versions/{v}");
        }
        if let Some(l) = &self.label {
            p += &format!("/labels/{l}");
        }
        if self.metadata {
            p += "/metadata";
        }
        if let Some(v) = &self.verb {
            p += &format!(":{v}");
        }
        p
    }
}
