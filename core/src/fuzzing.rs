//! The fuzz targets' bodies (`fuzz/fuzz_targets/*.rs` call these), with the invariants
//! each states as assertions: a violated one panics, which the fuzzer reports as a crash.
//! The corpora under `fuzz/corpus/<target>/` are replayed through the same functions by
//! `core/tests/corpus.rs` in every `make test`, with no fuzzer and no sanitizer build.
//!
//! Every target: no input panics. Beyond that:
//! - `archive`: an accepted archive unpacks only inside its destination (no symlink
//!   leads out), within the limits it was given, and packing what it unpacked then
//!   unpacking that again gives the same digest;
//! - `manifest`: parsing is deterministic, a manifest the checks accept names a valid
//!   bundle with paths inside it, and its dependencies parse;
//! - `tensor_json`: an accepted JSON tensor holds exactly the bytes its shape says, is
//!   written back within `json_bound`, and written JSON reads back to the same bytes;
//! - `binary`: the binary extension's split and take never read past the body, and
//!   give back exactly the bytes asked for;
//! - `tfserving_predict`: a predict body accepted against a signature gives one tensor
//!   per named input, of the input's dtype, holding exactly its shape's bytes (rows
//!   stacked on dim 0); written back as the answer, it is JSON with one prediction per row;
//! - `v2_infer`: a KServe v2 request accepted (its JSON head and binary tail) gives one
//!   tensor per input, each name once, with the declared shape and exactly its bytes, and
//!   uses the tail up;
//! - `grpc_infer`: a KServe `ModelInferRequest` (protobuf) accepted gives one tensor
//!   per input, with the declared name and shape and exactly its bytes, at most 8 bytes
//!   of tensor per byte of message; sent again as `raw_input_contents` it decodes to the
//!   same tensors; an error message stays bounded;
//! - `tfserving_grpc`: each `TensorProto` of a TF Serving `PredictRequest` accepted holds
//!   exactly its shape's bytes, no more than the limit or 8 bytes per byte of message,
//!   and written back as TF Serving answers it, reads back to the same tensor;
//! - `plugin_io`: a handler plugin's answer made fit for HTTP has a status in 200-599,
//!   keeps every header the plugin set except the host's own, and carries its content
//!   type; a BYTES tensor split into elements is exactly their framing put back together;
//! - `url_target`: an accepted `/v1/models/...` path has a valid model name, version and
//!   label, and its canonical spelling parses back to the same target; an error message
//!   stays bounded whatever the path's length.

use crate::archive::{self, Limits};
use crate::bundle;
use crate::codec;
use crate::tensor::DType;
use std::path::Path;

/// Limits small enough that one input is quick, as a server's would be for it.
fn fuzz_limits() -> Limits {
    Limits {
        max_archive_bytes: 1 << 20,
        max_file_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
        max_entries: 256,
        max_ratio: 100,
        ratio_floor: 1 << 20,
    }
}

/// An untrusted `.tar.gz` (an upload or a bucket's object).
pub fn archive(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else { return };
    let dest = dir.path().join("out");
    std::fs::create_dir(&dest).expect("a fresh directory");
    let limits = fuzz_limits();
    let Ok(unpacked) = archive::unpack(data, &dest, &limits) else {
        return;
    };
    assert!(
        unpacked.files <= limits.max_entries,
        "{} files",
        unpacked.files
    );
    assert!(
        unpacked.bytes <= limits.max_total_bytes,
        "{} bytes",
        unpacked.bytes
    );
    let files = archive::list_files(&dest).expect("the unpacked tree can be listed");
    let root = dest.canonicalize().expect("the destination exists");
    for (rel, meta) in &files {
        let path = dest.join(rel);
        assert!(
            !rel.starts_with('/') && !rel.split('/').any(|c| c == ".."),
            "{rel}"
        );
        if meta.file_type().is_symlink() {
            // A symlink that resolves must resolve inside; a dangling one leads nowhere.
            if let Ok(target) = path.canonicalize() {
                assert!(
                    target.starts_with(&root),
                    "{rel} leads to {}",
                    target.display()
                );
            }
        } else {
            assert!(
                meta.len() <= limits.max_file_bytes,
                "{rel}: {} bytes",
                meta.len()
            );
        }
    }
    let first = archive::digest(&dest).expect("the unpacked tree has a digest");
    let mut packed = Vec::new();
    archive::pack(&dest, &mut packed, |_| {}).expect("what was unpacked can be packed");
    let again = dir.path().join("again");
    std::fs::create_dir(&again).expect("a fresh directory");
    let big = Limits {
        max_archive_bytes: 64 << 20,
        ratio_floor: 64 << 20,
        ..limits
    };
    archive::unpack(&packed[..], &again, &big).unwrap_or_else(|why| {
        panic!("our own packing of an accepted archive was refused: {why:?}")
    });
    assert_eq!(
        first,
        archive::digest(&again).expect("digest"),
        "the round trip changed the content"
    );
}

/// An untrusted `bundle.toml`.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = bundle::parse_manifest(text);
    // Deterministic: the same text, the same answer.
    assert_eq!(
        format!("{parsed:?}"),
        format!("{:?}", bundle::parse_manifest(text)),
        "parsing twice differed"
    );
    let Ok(manifest) = parsed else { return };
    let reasons = manifest.check();
    if !reasons.is_empty() {
        return;
    }
    assert!(
        bundle::valid_name(&manifest.bundle.name),
        "{:?}",
        manifest.bundle.name
    );
    for (what, path) in manifest.paths() {
        bundle::relative_path(path).unwrap_or_else(|e| panic!("{what} {path:?} passed: {e}"));
    }
    if let Some(h) = &manifest.handler {
        for d in &h.dependencies {
            bundle::Dependency::parse(d).unwrap_or_else(|e| panic!("dependency {d:?} passed: {e}"));
        }
    }
}

/// A JSON tensor as TF Serving's `instances`/`inputs` and KServe v2's `data` carry one;
/// the first byte picks the dtype.
pub fn tensor_json(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let dtype = DType::ALL[pick as usize % DType::ALL.len()];
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let Ok(t) = codec::tensor_from_json("x", &value, dtype) else {
        return;
    };
    let want =
        crate::tensor::checked_bytes(&t.shape, t.dtype).expect("an accepted shape has a size");
    assert_eq!(t.data.len(), want, "shape {:?} of {dtype}", t.shape);
    let mut out = Vec::new();
    codec::write_flat_json(&mut out, &t);
    assert!(
        out.len() as u64 <= codec::json_bound(&t),
        "{} bytes written, bound {}",
        out.len(),
        codec::json_bound(&t)
    );
    // Written JSON reads back to the same bytes (non-finite floats are written as text).
    let finite = t.to_f64_vec().iter().all(|v| v.is_finite());
    if finite {
        let flat: serde_json::Value = serde_json::from_slice(&out).expect("we write valid JSON");
        let back = codec::tensor_from_json("x", &flat, dtype).expect("we read what we write");
        assert_eq!(back.data, t.data, "{dtype} did not round-trip");
    }
}

/// A body with Triton's binary tensor extension: the first two bytes give the JSON
/// header's length, the next two each part's size.
pub fn binary(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let header_len = u16::from_le_bytes([data[0], data[1]]) as usize;
    let size = u16::from_le_bytes([data[2], data[3]]) as usize;
    let body = &data[4..];
    let Ok((head, mut tail)) = codec::split_binary(body, header_len) else {
        return;
    };
    assert_eq!(head.len() + tail.len(), body.len());
    assert_eq!(head, &body[..header_len]);
    let mut taken = 0;
    while let Ok(part) = codec::take_binary(&mut tail, size, "x") {
        assert_eq!(part.len(), size);
        taken += size;
        if size == 0 || taken > body.len() {
            break;
        }
    }
}

/// The signatures the predict target decodes against, picked by an input's first byte:
/// one fp32 input; two named inputs (int64 ids and a bool mask); one int8 image.
const SIGNATURES: [&str; 3] = [
    r#"inputs = [{ name = "x", dtype = "fp32", shape = [-1, 4] }]"#,
    r#"inputs = [{ name = "ids", dtype = "int64", shape = [-1, -1] }, { name = "mask", dtype = "bool", shape = [-1, -1] }]"#,
    r#"inputs = [{ name = "image", dtype = "int8", shape = [-1, 2, 2, 3] }]"#,
];

/// A TF Serving REST predict body.
pub fn tfserving_predict(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let sig = SIGNATURES[pick as usize % SIGNATURES.len()];
    let manifest = format!(
        "[bundle]\nname = \"m\"\nversion = 1\n[model]\nbackend = \"torchscript\"\npath = \"m.pt\"\n{sig}\noutputs = []\n"
    );
    let spec = bundle::parse_manifest(&manifest)
        .expect("a fixed signature")
        .model
        .expect("a model");
    let Ok((inputs, rows)) = crate::tfserving::decode_predict(&spec, body) else {
        return;
    };
    let mut batch = None;
    for (name, t) in &inputs {
        let declared = spec
            .inputs
            .iter()
            .find(|i| &i.name == name)
            .unwrap_or_else(|| panic!("{name} is not an input"));
        assert_eq!(t.dtype, declared.dtype, "{name}");
        let want =
            crate::tensor::checked_bytes(&t.shape, t.dtype).expect("an accepted shape has a size");
        assert_eq!(t.data.len(), want, "{name} {:?}", t.shape);
        if rows {
            let n = *t
                .shape
                .first()
                .unwrap_or_else(|| panic!("{name}: rows without a batch dimension"));
            assert_eq!(*batch.get_or_insert(n), n, "inputs disagree on the rows");
        }
    }
    let mut out = Vec::new();
    if rows {
        if crate::tfserving::write_predictions(&mut out, &inputs).is_err() {
            return;
        }
        let answer: serde_json::Value = serde_json::from_slice(&out).expect("we write valid JSON");
        let predictions = answer["predictions"]
            .as_array()
            .expect("a list of predictions");
        assert_eq!(
            Some(predictions.len() as i64),
            batch,
            "one prediction per row"
        );
    } else {
        crate::tfserving::write_outputs(&mut out, &inputs);
        let _: serde_json::Value = serde_json::from_slice(&out).expect("we write valid JSON");
    }
}

/// A KServe v2 inference request over HTTP: the first two bytes give the JSON head's
/// length (`Inference-Header-Content-Length`; 0 for a JSON-only body), the rest is the body.
pub fn v2_infer(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let header_len = u16::from_le_bytes([data[0], data[1]]) as usize;
    let body = &data[2..];
    let (head, tail) = if header_len == 0 {
        (body, &[][..])
    } else {
        match codec::split_binary(body, header_len) {
            Ok(parts) => parts,
            Err(_) => return,
        }
    };
    let Ok(req) = crate::v2::parse_request(head) else {
        return;
    };
    let Ok(inputs) = crate::v2::decode_inputs(&req, tail) else {
        return;
    };
    assert_eq!(inputs.len(), req.inputs.len());
    let mut seen = std::collections::HashSet::new();
    for ((name, t), declared) in inputs.iter().zip(&req.inputs) {
        assert!(seen.insert(name.clone()), "{name} twice");
        assert_eq!(name, &declared.name);
        assert_eq!(t.shape, declared.shape, "{name}");
        let want =
            crate::tensor::checked_bytes(&t.shape, t.dtype).expect("an accepted shape has a size");
        assert_eq!(t.data.len(), want, "{name} {:?}", t.shape);
    }
    let binary: u64 = req
        .inputs
        .iter()
        .filter_map(|i| {
            i.parameters
                .get("binary_data_size")
                .and_then(|v| v.as_u64())
        })
        .sum();
    assert_eq!(
        binary,
        tail.len() as u64,
        "the tail was not used up exactly"
    );
}

/// The path after `/v1/models/` of a TF Serving REST request.
pub fn url_target(data: &[u8]) {
    let Ok(rest) = std::str::from_utf8(data) else {
        return;
    };
    match crate::target::parse_target(rest) {
        Ok(t) => {
            assert!(crate::names::valid_name(&t.model), "{:?}", t.model);
            if let Some(v) = t.version {
                crate::names::check_version(v).expect("an accepted version is in range");
            }
            if let Some(l) = &t.label {
                assert!(crate::names::valid_name(l), "{l:?}");
            }
            assert_eq!(
                crate::target::parse_target(&t.path()).as_ref(),
                Ok(&t),
                "{rest:?} does not round-trip through {:?}",
                t.path()
            );
        }
        Err(crate::target::RouteError::BadRequest(m) | crate::target::RouteError::NotFound(m)) => {
            // The path is shown back bounded, never whole.
            assert!(
                m.len() <= 1024,
                "a {}-byte message for a {}-byte path",
                m.len(),
                rest.len()
            );
        }
    }
}

/// How long an error message may be, whatever the input: untrusted text in it is bounded.
const MAX_MESSAGE: usize = 2048;

/// A KServe v2 `ModelInferRequest` off the wire (the gRPC message's bytes).
pub fn grpc_infer(data: &[u8]) {
    use crate::grpc::inference::ModelInferRequest;
    use prost::Message;
    let Ok(req) = ModelInferRequest::decode(data) else {
        return;
    };
    let inputs = match crate::grpc::decode_infer_inputs(&req) {
        Ok(inputs) => inputs,
        Err(e) => {
            assert!(e.len() <= MAX_MESSAGE, "an error of {} bytes", e.len());
            return;
        }
    };
    assert_eq!(inputs.len(), req.inputs.len());
    let mut total = 0;
    for ((name, t), declared) in inputs.iter().zip(&req.inputs) {
        assert_eq!(name, &declared.name);
        assert_eq!(t.shape, declared.shape, "{name}");
        let want =
            crate::tensor::checked_bytes(&t.shape, t.dtype).expect("an accepted shape has a size");
        assert_eq!(t.data.len(), want, "{name} {:?}", t.shape);
        total += t.data.len();
    }
    assert!(
        total <= data.len() * 8,
        "{total} bytes of tensors from a message of {}",
        data.len()
    );
    // The same tensors as raw contents, through the wire again.
    let mut raw = req.clone();
    raw.raw_input_contents = inputs
        .iter()
        .map(|(_, t)| bytes::Bytes::from(t.data.clone()))
        .collect();
    for i in &mut raw.inputs {
        i.contents = None;
    }
    let raw = ModelInferRequest::decode(raw.encode_to_vec().as_slice()).expect("our encoding");
    if inputs.is_empty() {
        return;
    }
    let again = crate::grpc::decode_infer_inputs(&raw).expect("raw contents of accepted tensors");
    assert_eq!(again, inputs);
}

/// The largest tensor a TF Serving typed list may fill here (the server's is its
/// max_request_bytes).
const FILL_LIMIT: usize = 1 << 20;

/// A TF Serving `PredictRequest` off the wire (the gRPC message's bytes).
pub fn tfserving_grpc(data: &[u8]) {
    use crate::grpc::tensorflow::serving::PredictRequest;
    use prost::Message;
    let Ok(req) = PredictRequest::decode(data) else {
        return;
    };
    for (name, p) in &req.inputs {
        let t = match crate::grpc::tensor_from_proto(name, p, FILL_LIMIT) {
            Ok(t) => t,
            Err(e) => {
                assert!(e.len() <= MAX_MESSAGE, "an error of {} bytes", e.len());
                continue;
            }
        };
        let want =
            crate::tensor::checked_bytes(&t.shape, t.dtype).expect("an accepted shape has a size");
        assert_eq!(t.data.len(), want, "{:?}", t.shape);
        assert!(
            t.data.len() <= FILL_LIMIT.max(data.len() * 8),
            "{} bytes from a message of {}",
            t.data.len(),
            data.len()
        );
        let answer = crate::grpc::tensor_to_proto(t.clone());
        let answer =
            crate::grpc::tensorflow::TensorProto::decode(answer.encode_to_vec().as_slice())
                .expect("our encoding");
        let back = crate::grpc::tensor_from_proto(name, &answer, FILL_LIMIT)
            .expect("an answer reads back");
        assert_eq!(back, t);
    }
}

/// A handler plugin's answer head, and the same bytes as a BYTES tensor. The head: a
/// status (2 bytes, little-endian), then records separated by `\x1e`, each a header
/// `name\x1fvalue`, or the content type when it has no `\x1f`.
pub fn plugin_io(data: &[u8]) {
    use crate::plugin_io::{answer_head, bytes_element, host_owned, split_bytes_elements};
    match split_bytes_elements(data) {
        Ok(elements) => {
            let again: Vec<u8> = elements.iter().flat_map(|e| bytes_element(e)).collect();
            assert_eq!(
                again, data,
                "the elements are not the framing put back together"
            );
        }
        Err(e) => assert!(e.len() <= MAX_MESSAGE, "an error of {} bytes", e.len()),
    }
    if data.len() < 2 {
        return;
    }
    let status = u16::from_le_bytes([data[0], data[1]]);
    let text = String::from_utf8_lossy(&data[2..]);
    let mut headers = Vec::new();
    let mut content_type = None;
    for record in text.split('\u{1e}') {
        match record.split_once('\u{1f}') {
            Some((k, v)) => headers.push((k.to_string(), v.to_string())),
            None => content_type = Some(record.to_string()),
        }
    }
    let (st, map) = match answer_head(status, &headers, content_type.as_deref()) {
        Ok(head) => head,
        Err(e) => {
            assert!(e.len() <= MAX_MESSAGE, "an error of {} bytes", e.len());
            return;
        }
    };
    assert!((200..=599).contains(&st.as_u16()), "status {st}");
    for name in map.keys() {
        assert!(!host_owned(name), "the host's own header {name} kept");
    }
    if let Some(ct) = &content_type {
        let got: Vec<_> = map.get_all(http::header::CONTENT_TYPE).iter().collect();
        assert_eq!(got, [ct.as_str()], "the content type");
    }
    for (k, v) in &headers {
        let name = http::HeaderName::try_from(k.as_str()).expect("accepted names parse");
        if host_owned(&name) || (content_type.is_some() && name == http::header::CONTENT_TYPE) {
            continue;
        }
        assert!(
            map.get_all(&name).iter().any(|x| x == v.as_str()),
            "header {name} lost"
        );
    }
}

/// Every target by name, for the corpus replay (`core/tests/corpus.rs`).
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("archive", archive),
    ("manifest", manifest),
    ("tensor_json", tensor_json),
    ("binary", binary),
    ("url_target", url_target),
    ("tfserving_predict", tfserving_predict),
    ("v2_infer", v2_infer),
    ("grpc_infer", grpc_infer),
    ("tfserving_grpc", tfserving_grpc),
    ("plugin_io", plugin_io),
];

/// Where the corpora are, from this crate's directory.
pub fn corpus_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus"))
}
