//! The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json` and written
//! to `docs/openapi.json` (`nnserve openapi`, `make openapi`).
//!
//! It is derived from the code with `utoipa`: each operation is the `#[utoipa::path]`
//! attribute of the function that serves it (`v1`, `v2`, this module), and the bodies
//! are the `ToSchema` types below or the request types themselves (`nnserve_core::v2`,
//! `lifecycle::Stored`). Two modifiers finish it, so that what the router shares is
//! written once:
//! - [`Variants`]: the router serves `/v2/models/{model}...` and
//!   `/v2/models/{model}/versions/{version}...` with one handler, and TF Serving's
//!   `/v1/models/{model}...` also under `/versions/{version}` and `/labels/{label}`
//!   (core/src/target.rs parses them). Each operation is documented once, on the bare
//!   path, and copied to its other spellings.
//! - [`CommonAnswers`]: answers every operation of a kind gives (a bad name or version in
//!   the path, a body too large or too slow, a missing token) and the error shape
//!   `{"error": message}` on every 4xx and 5xx.
//!
//! The tests keep it true: every route of `router` is a path here (a unit test below),
//! every path here answers on a live server, and schemathesis checks the answers
//! against the document (tests/e2e/test_openapi.py).

use utoipa::openapi::path::{Operation, Parameter, ParameterIn, PathItem};
use utoipa::openapi::response::Response as DocResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Required};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error: `{"error": message}`. The message says what went wrong and what to do;
/// it never quotes more than a bounded piece of the request.
#[derive(serde::Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v2`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ServerMetadata {
    name: String,
    version: String,
    /// `binary_tensor_data`.
    extensions: Vec<String>,
}

/// `GET /v2/health/live`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Live {
    live: bool,
}

/// `GET /v2/health/ready`: `reason` when not ready (loading or draining).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Ready {
    ready: bool,
    #[schema(required = false)]
    reason: Option<String>,
}

/// A tensor of a v2 model's signature; `-1` is a dimension of any size.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct V2TensorMetadata {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

/// `GET /v2/models/{model}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct V2ModelMetadata {
    name: String,
    /// The available versions, newest first.
    versions: Vec<String>,
    /// `pytorch_libtorch`, `tensorflow_savedmodel` or `nnserve_plugin`.
    platform: String,
    inputs: Vec<V2TensorMetadata>,
    outputs: Vec<V2TensorMetadata>,
}

/// `GET /v2/models/{model}/ready`: 200 when ready.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ModelReady {
    name: String,
    ready: bool,
}

/// `GET /v2/models/{model}/ready` of a model that is known but not available (400), or
/// an error (a name that breaks the naming rule: `error` alone).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ModelNotReady {
    #[schema(required = false)]
    name: Option<String>,
    #[schema(required = false)]
    ready: Option<bool>,
    error: String,
}

/// One output of a v2 answer: `data` in JSON, or `parameters.binary_data_size` bytes
/// after the JSON head (Triton's extension).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct V2OutputTensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    #[schema(required = false)]
    data: Option<Vec<serde_json::Value>>,
    #[schema(required = false, value_type = Object)]
    parameters: Option<serde_json::Value>,
}

/// `POST /v2/models/{model}/infer`'s answer.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct V2InferResponse {
    model_name: String,
    model_version: String,
    /// The request's `id`, when it had one.
    #[schema(required = false)]
    id: Option<serde_json::Value>,
    outputs: Vec<V2OutputTensor>,
}

/// One model version in Triton's repository index.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RepositoryIndexEntry {
    name: String,
    version: String,
    /// `READY` or `UNAVAILABLE`.
    state: String,
    /// Why it is not ready (the full error for the admin).
    reason: String,
}

/// An empty object: Triton's repository load and unload answer `{}`.
#[derive(ToSchema)]
pub struct Empty {}

/// TF Serving's `:predict` body: `instances` (row format) or `inputs` (columnar).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PredictRequest {
    #[schema(required = false)]
    signature_name: Option<String>,
    /// A row per example: a value, or an object of named inputs.
    #[schema(required = false)]
    instances: Option<Vec<serde_json::Value>>,
    /// The whole batch per input: a value, or an object of named inputs.
    #[schema(required = false)]
    inputs: Option<serde_json::Value>,
}

/// TF Serving's `:predict` answer: `predictions` for `instances`, `outputs` for `inputs`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PredictResponse {
    #[schema(required = false)]
    predictions: Option<Vec<serde_json::Value>>,
    #[schema(required = false)]
    outputs: Option<serde_json::Value>,
}

/// TF Serving's version status.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct VersionStatus {
    version: String,
    /// `START`, `LOADING`, `AVAILABLE`, `UNLOADING` or `END`.
    state: String,
    status: StatusDetail,
}

/// `OK`, or `UNKNOWN` with a message (the full error for the admin).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct StatusDetail {
    error_code: String,
    error_message: String,
}

/// `GET /v1/models/{model}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ModelStatus {
    model_version_status: Vec<VersionStatus>,
}

/// TF Serving's `GetModelMetadata` answer.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TfModelMetadata {
    #[schema(value_type = Object)]
    model_spec: serde_json::Value,
    /// `signature_def.signature_def.serving_default` with `inputs` and `outputs`.
    #[schema(value_type = Object)]
    metadata: serde_json::Value,
}

/// A version in `GET /v1/models`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct VersionEntry {
    version: String,
    state: String,
    error: Option<String>,
    /// The stored archive's SHA-256 (`sha256:...`).
    digest: Option<String>,
    /// Unix seconds.
    uploaded_at: Option<u64>,
    /// How a loaded version runs: device, batching, threads.
    #[schema(required = false, value_type = Object)]
    execution: Option<serde_json::Value>,
}

/// A model in `GET /v1/models`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ModelEntry {
    name: String,
    versions: Vec<VersionEntry>,
    labels: std::collections::BTreeMap<String, u64>,
}

/// `GET /v1/models`: every model; `repository` when it is an object store.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ModelList {
    models: Vec<ModelEntry>,
    #[schema(required = false, value_type = Object)]
    repository: Option<serde_json::Value>,
}

/// `PUT /v1/models/{model}/labels/{label}`'s body.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LabelRequest {
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    version: u64,
    /// Point the label at a version that is not available (TF Serving's
    /// `allow_version_labels_for_unavailable_models`).
    #[schema(required = false)]
    force: Option<bool>,
}

/// The label as set.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LabelSet {
    name: String,
    label: String,
    version: u64,
}

/// A deleted version.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Deleted {
    name: String,
    version: u64,
    deleted: bool,
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "server",
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
pub(super) async fn document() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT.clone(),
    )
        .into_response()
}

/// The document as served, built once.
static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
});

/// The document as JSON text, as `docs/openapi.json` holds it.
pub fn document_json() -> String {
    DOCUMENT.clone()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "nnserve",
        description = "nnserve's HTTP API: TF Serving REST (`/v1`), KServe v2 / Open Inference Protocol (`/v2`, with Triton's binary tensors and repository extension), the plugin endpoint (`:infer`), management (upload, labels, delete) and probes. docs/http-api.md tells the same in prose. Every error is `{\"error\": message}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::v2::server_metadata,
        super::v2::live,
        super::v2::ready,
        super::metrics,
        document,
        super::v1::list_models,
        super::v1::get_model,
        super::v1::tf_metadata,
        super::v1::predict,
        super::v1::plugin_infer,
        super::v1::upload,
        super::v1::put_model,
        super::v1::delete_model,
        super::v2::model_metadata,
        super::v2::model_ready,
        super::v2::infer,
        super::v2::repository_index,
        super::v2::repository_load,
        super::v2::repository_unload,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Variants, &CommonAnswers, &Security, &Links),
    tags(
        (name = "server", description = "Server metadata, probes, metrics and this document"),
        (name = "tfserving", description = "TensorFlow Serving's REST API"),
        (name = "kserve-v2", description = "KServe v2 / Open Inference Protocol over HTTP"),
        (name = "plugins", description = "A bundle's handler plugin: any body in, the plugin's answer out"),
        (name = "management", description = "Uploads, labels, deletes and Triton's repository extension: a bearer token under `--management token`, open under `--management open`, absent under `--management off`"),
    ),
)]
pub struct ApiDoc;

/// The security scheme name of the management token.
pub const ADMIN_SCHEME: &str = "admin_token";

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The token in the file given by `--admin-token-file` (docs/http-api.md, Management)",
                    ))
                    .build(),
            ),
        );
    }
}

/// OpenAPI links, the steps a client takes next with what an answer names (schemathesis
/// follows them in its stateful phase): an uploaded version is then read, served and
/// deleted; a label set is then read and served by.
struct Links;

/// `(path, method, statuses, [(link, operation id)], [(parameter, from the answer)])`.
type LinkSpec = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, &'static str)],
);

const LINKS: &[LinkSpec] = &[
    (
        "/v1/models/{model}/versions",
        "post",
        &["200", "201"],
        &[
            ("status", "get_model_by_version"),
            ("predict", "predict_by_version"),
            ("v2_infer", "infer_by_version"),
            ("v2_ready", "model_ready_by_version"),
            ("delete", "delete_model"),
        ],
        &[
            ("model", "$response.body#/name"),
            ("version", "$response.body#/version"),
        ],
    ),
    (
        "/v1/models/{model}/labels/{label}",
        "put",
        &["200"],
        &[
            ("status", "get_model_by_label"),
            ("predict", "predict_by_label"),
        ],
        &[
            ("model", "$response.body#/name"),
            ("label", "$response.body#/label"),
        ],
    ),
];

impl Modify for Links {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::link::LinkBuilder;
        for (path, method, statuses, links, params) in LINKS {
            let item = doc
                .paths
                .paths
                .get_mut(*path)
                .expect("a linked path exists");
            let op = match *method {
                "post" => item.post.as_mut(),
                _ => item.put.as_mut(),
            }
            .expect("a linked operation exists");
            for status in *statuses {
                let Some(RefOr::T(answer)) = op.responses.responses.get_mut(*status) else {
                    panic!("{method} {path} documents no {status}");
                };
                for (name, target) in *links {
                    let mut link = LinkBuilder::new().operation_id(*target);
                    for (param, from) in *params {
                        link = link.parameter(*param, *from);
                    }
                    answer
                        .links
                        .insert(name.to_string(), RefOr::T(link.build()));
                }
            }
        }
    }
}

/// The other spellings of a documented path: `(prefix, segment inserted after it, the
/// segment's parameter)`.
const SPELLINGS: &[(&str, &str, &str)] = &[
    ("/v2/models/{model}", "/versions/{version}", "version"),
    ("/v1/models/{model}", "/versions/{version}", "version"),
    ("/v1/models/{model}", "/labels/{label}", "label"),
];

/// Copies each operation documented on `/v2/models/{model}...` to
/// `/v2/models/{model}/versions/{version}...`, and each TF Serving inference and
/// metadata operation on `/v1/models/{model}...` to its `/versions/{version}` and
/// `/labels/{label}` spellings, with the parameter added and an operation id of its own.
/// Management paths, which name their own segments, are left alone.
struct Variants;

impl Modify for Variants {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        // Each `{name}` of a path is its parameter, declared here once for every path.
        for (path, item) in doc.paths.paths.iter_mut() {
            let names: Vec<&str> = path
                .split('{')
                .skip(1)
                .filter_map(|p| p.split_once('}').map(|(n, _)| n))
                .collect();
            for op in operations(item) {
                let params = op.parameters.get_or_insert_with(Vec::new);
                for name in names.iter().rev() {
                    if !params
                        .iter()
                        .any(|p| matches!(p, RefOr::T(p) if p.name == *name))
                    {
                        params.insert(0, RefOr::T(path_parameter(name)));
                    }
                }
            }
        }
        let mut added = Vec::new();
        for (path, item) in doc.paths.paths.iter() {
            for (prefix, segment, param) in SPELLINGS {
                let Some(tail) = path.strip_prefix(prefix) else {
                    continue;
                };
                // The bare model path's own operations: `{model}`, `{model}:verb`,
                // `{model}/metadata`, `{model}/ready`, `{model}/infer`.
                let bare = tail.is_empty()
                    || tail.starts_with(':')
                    || matches!(tail, "/metadata" | "/ready" | "/infer");
                if !bare {
                    continue;
                }
                let mut item = item.clone();
                for op in operations(&mut item) {
                    op.parameters
                        .get_or_insert_with(Vec::new)
                        .push(RefOr::T(path_parameter(param)));
                    if let Some(id) = &mut op.operation_id {
                        *id = format!("{id}_by_{param}");
                    }
                }
                added.push((format!("{prefix}{segment}{tail}"), item));
            }
        }
        for (path, item) in added {
            // `/v1/models/{m}/versions/{v}` also holds the management DELETE.
            match doc.paths.paths.get_mut(&path) {
                Some(existing) => merge(existing, item),
                None => {
                    doc.paths.paths.insert(path, item);
                }
            }
        }
    }
}

/// Adds `other`'s operations to `item` (each method is documented once).
fn merge(item: &mut PathItem, other: PathItem) {
    let pairs = [
        (&mut item.get, other.get),
        (&mut item.put, other.put),
        (&mut item.post, other.post),
        (&mut item.delete, other.delete),
        (&mut item.head, other.head),
        (&mut item.patch, other.patch),
    ];
    for (mine, theirs) in pairs {
        if mine.is_none() {
            *mine = theirs;
        }
    }
}

/// The operations of a path item.
fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.head,
        &mut item.patch,
    ]
    .into_iter()
    .filter_map(|o| o.as_mut())
}

/// A path parameter: a name (`model`, `label`) follows the naming rule, a version is a
/// whole number from 1 to 2^63-1 (core/src/names.rs).
pub(crate) fn path_parameter(name: &str) -> Parameter {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let schema = if name == "version" {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(nnserve_core::names::MAX_VERSION as i64))
            .examples([serde_json::json!(1)])
            .build()
    } else {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"))
            .examples([serde_json::json!(if name == "label" {
                "stable"
            } else {
                "mlp"
            })])
            .build()
    };
    let what = match name {
        "model" => "A model (or endpoint) name: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters",
        "label" => "A version label (e.g. `stable`), named by the same rule",
        _ => "A version number, 1 to 2^63-1",
    };
    utoipa::openapi::path::ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(what))
        .schema(Some(schema))
        .build()
}

/// Answers every operation of a kind gives, added where the operation does not document
/// them itself, and `{"error": message}` as the body of every 4xx and 5xx:
/// - a path with a name or version: 400 when it breaks the rule;
/// - a body: 408 when it stops arriving, 413 over the limit;
/// - management: 401 without the token.
struct CommonAnswers;

impl Modify for CommonAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for item in doc.paths.paths.values_mut() {
            for op in operations(item) {
                let has_params = op.parameters.as_ref().is_some_and(|p| {
                    p.iter().any(
                        |p| matches!(p, RefOr::T(p) if matches!(p.parameter_in, ParameterIn::Path)),
                    )
                });
                let has_body = op.request_body.is_some();
                let managed = op.security.is_some();
                let mut common: Vec<(&str, &str)> = Vec::new();
                if has_params {
                    common.push((
                        "400",
                        "A name or version in the path breaks the naming rule, or the request is malformed",
                    ));
                }
                if has_body {
                    common.push(("408", "The request body stopped arriving (a slow client)"));
                    common.push(("413", "The request body is over the server's limit"));
                }
                if managed {
                    common.push((
                        "401",
                        "The bearer token is missing or wrong (`--management token`)",
                    ));
                }
                for (status, description) in common {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| RefOr::T(DocResponse::new(description)));
                }
                for (status, answer) in op.responses.responses.iter_mut() {
                    let error = status.starts_with('4') || status.starts_with('5');
                    if let (true, RefOr::T(answer)) = (error, answer) {
                        if answer.content.is_empty() {
                            answer.content.insert(
                                "application/json".into(),
                                RefOr::T(Content::new(Some(Ref::from_schema_name("ErrorBody")))),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> serde_json::Value {
        serde_json::from_str(&document_json()).unwrap()
    }

    /// Every route the router registers is a documented path (the TF Serving catch-all
    /// stands for the `/v1/models/...` paths, checked against the parser below).
    #[test]
    fn every_route_is_documented() {
        let doc = doc();
        let paths = doc["paths"].as_object().unwrap();
        let source = include_str!("mod.rs");
        let mut routes = 0;
        for piece in source.split(".route(").skip(1) {
            let Some(path) = piece.trim_start().strip_prefix('"') else {
                continue;
            };
            let path = &path[..path.find('"').unwrap()];
            routes += 1;
            if path == "/v1/models/{*rest}" {
                continue;
            }
            assert!(
                paths.contains_key(path),
                "route {path} is not in the OpenAPI document"
            );
        }
        assert!(routes > 15, "found only {routes} routes in api/mod.rs");
    }

    /// Every documented TF Serving path is one the `/v1/models/{*rest}` parser takes, as
    /// the operation it is documented as.
    #[test]
    fn every_v1_path_parses_as_documented() {
        let doc = doc();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            let Some(rest) = path.strip_prefix("/v1/models/") else {
                continue;
            };
            let rest = rest
                .replace("{model}", "mlp")
                .replace("{version}", "3")
                .replace("{label}", "stable");
            seen += 1;
            if rest == "mlp/versions" {
                assert!(item.get("post").is_some());
                continue;
            }
            let t = nnserve_core::target::parse_target(&rest)
                .unwrap_or_else(|e| panic!("{path} does not parse: {e:?}"));
            assert_eq!(t.model, "mlp");
            assert_eq!(t.version, path.contains("{version}").then_some(3), "{path}");
            let label = path.contains("{label}").then(|| "stable".to_string());
            assert_eq!(t.label, label, "{path}");
            assert_eq!(t.metadata, path.ends_with("/metadata"), "{path}");
            let verb = path.rsplit_once(':').map(|(_, v)| v.to_string());
            assert_eq!(t.verb, verb, "{path}");
            if verb.is_some() {
                assert!(item.get("post").is_some(), "{path}: a verb is a POST");
            }
        }
        assert!(seen >= 13, "only {seen} /v1/models paths documented");
    }

    #[test]
    fn every_link_names_an_operation() {
        let doc = doc();
        let mut ids = std::collections::BTreeSet::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                if let Some(id) = op["operationId"].as_str() {
                    assert!(ids.insert(id.to_string()), "operation id {id} twice");
                }
            }
        }
        let mut links = 0;
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for r in op["responses"]
                    .as_object()
                    .into_iter()
                    .flat_map(|r| r.values())
                {
                    for link in r["links"].as_object().into_iter().flat_map(|l| l.values()) {
                        links += 1;
                        let id = link["operationId"].as_str().unwrap();
                        assert!(ids.contains(id), "a link names {id}, which is no operation");
                    }
                }
            }
        }
        assert!(links >= 12, "{links} links");
    }

    #[test]
    fn errors_statuses_and_security_are_documented() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["components"]["securitySchemes"][ADMIN_SCHEME].is_object());
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some(responses) = op["responses"].as_object() else {
                    continue;
                };
                for (status, r) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert!(
                            r["content"]["application/json"].is_object(),
                            "{method} {path} {status} has no JSON error body"
                        );
                    }
                }
                let managed = op.get("security").is_some();
                assert_eq!(
                    managed,
                    responses.contains_key("401"),
                    "{method} {path}: a 401 exactly where a token is asked for"
                );
            }
        }
        let upload = &doc["paths"]["/v1/models/{model}/versions"]["post"];
        assert!(upload["security"].is_array());
        assert!(upload["responses"]["201"].is_object());
        // Inference may answer 503 (no version available) and 504 (a deadline).
        let infer = &doc["paths"]["/v2/models/{model}/versions/{version}/infer"]["post"];
        for s in ["200", "400", "404", "413", "429", "503", "504"] {
            assert!(infer["responses"][s].is_object(), "v2 infer lacks {s}");
        }
    }
}
