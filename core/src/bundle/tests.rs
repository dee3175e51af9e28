use super::*;
use crate::tensor::DType;

const MLP: &str = r#"
[bundle]
name = "mlp"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
device = "cpu"
inputs = [{ name = "input", dtype = "fp32", shape = [-1, 4] }]
outputs = [{ name = "output", dtype = "fp32", shape = [-1, 3] }]
"#;

#[test]
fn parses_a_model_manifest() {
    let m = parse_manifest(MLP).unwrap();
    assert_eq!(m.bundle.name, "mlp");
    let model = m.model.as_ref().unwrap();
    assert_eq!(model.inputs[0].dtype, DType::Fp32);
    assert_eq!(model.inputs[0].shape, vec![-1, 4]);
    assert!(m.check().is_empty(), "{:?}", m.check());
}

#[test]
fn a_manifest_error_is_one_line_naming_the_line() {
    let err =
        parse_manifest("[bundle]\nname = \"x\"\nversion = 1\nflavour = \"odd\"\n").unwrap_err();
    assert!(
        err.starts_with("bundle.toml line 4: unknown field `flavour`"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn unknown_fields_are_named() {
    let err = parse_manifest(&MLP.replace("device = \"cpu\"", "devise = \"cpu\"")).unwrap_err();
    assert!(err.contains("devise"), "{err}");
}

#[test]
fn handler_config_takes_any_value_as_a_string_or_as_json() {
    let text = format!(
        "{MLP}\n[handler]\npath = \"plugins/handler.wasm\"\nconfig = {{ top_k = 5, labels = \"assets/l.txt\", on = true, \
         classes = [\"cat\", \"dog\"], scale = {{ mean = 0.5, std = [1, 2] }} }}\n"
    );
    let m = parse_manifest(&text).unwrap();
    let h = m.handler.unwrap();
    let strings = h.config_strings();
    assert_eq!(strings["top_k"], "5");
    assert_eq!(strings["on"], "true");
    assert_eq!(strings["labels"], "assets/l.txt");
    assert_eq!(strings["classes"], r#"["cat","dog"]"#);
    let json: serde_json::Value = serde_json::from_str(&h.config_json()).unwrap();
    assert_eq!(json["scale"]["std"][1], 2);
    assert_eq!(json["classes"][0], "cat");
    assert_eq!(json["top_k"], 5);
    assert_eq!(h.limits.memory_mib, 64);
    assert_eq!(h.limits.cpu_ms, 100);
}

#[test]
fn every_reason_is_reported() {
    let text = MLP
        .replace("name = \"mlp\"", "name = \"Bad Name\"")
        .replace("version = 1", "version = 0")
        .replace("device = \"cpu\"", "device = \"tpu\"")
        .replace("model/model.pt", "../escape.pt");
    let reasons = parse_manifest(&text).unwrap().check();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].contains("bundle.name"));
    assert!(reasons.iter().any(|r| r.contains("`..` is not allowed")));
    assert!(reasons.iter().any(|r| r.contains("model.device")));
}

#[test]
fn batching_is_checked() {
    let ok = format!("{MLP}\n[batching]\nmax_batch_size = 8\nallowed_batch_sizes = [2, 8]\n");
    let m = parse_manifest(&ok).unwrap();
    assert!(m.check().is_empty(), "{:?}", m.check());
    assert_eq!(m.batching.as_ref().unwrap().max_enqueued_batches, 64);
    let bad = format!("{MLP}\n[batching]\nmax_batch_size = 8\nallowed_batch_sizes = [4, 2]\n")
        .replace("shape = [-1, 4]", "shape = [1, 4]");
    let reasons = parse_manifest(&bad).unwrap().check();
    assert!(
        reasons.iter().any(|r| r.contains("must be increasing")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("end with max_batch_size")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("first size must be -1")),
        "{reasons:?}"
    );
}

const AB: &str = r#"
[bundle]
name = "ab"
version = 1

[endpoint]
routing_key_header = "x-user-id"
default_variant = "b"

[[variants]]
model = "a"
weight = 90

[[variants]]
model = "b"
weight = 10

[router]
path = "plugins/router.wasm"
config = { shadow = "b" }
"#;

#[test]
fn a_batch_input_must_fit_in_memory() {
    let manifest = |shape: &str, batching: &str| {
        parse_manifest(&format!(
            "[bundle]\nname = \"m\"\nversion = 1\n[model]\nbackend = \"torchscript\"\npath = \"model/model.pt\"\n\
                 inputs = [{{ name = \"x\", dtype = \"fp32\", shape = {shape} }}]\n{batching}"
        ))
        .unwrap()
        .check()
    };
    assert_eq!(manifest("[-1, 4]", ""), Vec::<String>::new());
    let huge = manifest("[-1, 4000000000000]", "");
    assert!(
        huge.len() == 1 && huge[0].contains("over the 1024 MiB a batch input may take"),
        "{huge:?}"
    );
    let rows = manifest("[-1, 4]", "[batching]\nmax_batch_size = 100000000\n");
    assert!(
        rows.iter().any(|r| r.contains("[100000000, 4]")),
        "{rows:?}"
    );
    assert_eq!(
        manifest("[-1, 3, 224, 224]", "[batching]\nmax_batch_size = 64\n"),
        Vec::<String>::new()
    );
    let overflow = manifest("[-1, 4611686018427387904, 4]", "");
    assert_eq!(overflow.len(), 1, "{overflow:?}");
}

#[test]
fn parses_an_endpoint_manifest() {
    let m = parse_manifest(AB).unwrap();
    assert!(m.check().is_empty(), "{:?}", m.check());
    assert!(m.is_endpoint());
    let e = m.endpoint.as_ref().unwrap();
    assert_eq!(e.on_router_error, RouterErrorPolicy::FailOpen);
    assert_eq!(e.stats_window_ms, 10_000);
    assert_eq!(m.variants[1].name(), "b");
    assert_eq!(m.variants[0].weight, 90);
    assert_eq!(m.router.as_ref().unwrap().config_strings()["shadow"], "b");
    let closed = AB.replace(
        "default_variant = \"b\"",
        "on_router_error = \"fail-closed\"",
    );
    let m = parse_manifest(&closed).unwrap();
    assert_eq!(
        m.endpoint.unwrap().on_router_error,
        RouterErrorPolicy::FailClosed
    );
    assert!(parse_manifest(&AB.replace("fail-open", "")).is_ok());
    assert!(parse_manifest(&closed.replace("fail-closed", "fail-sometimes")).is_err());
}

#[test]
fn endpoint_manifests_are_checked() {
    // A model bundle's sections do not belong in an endpoint, and the reverse.
    let mixed = format!("{AB}\n[model]\nbackend = \"torchscript\"\npath = \"m.pt\"\n");
    let reasons = parse_manifest(&mixed).unwrap().check();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("an endpoint bundle has no [model]")),
        "{reasons:?}"
    );
    let text = AB
        .replace("default_variant = \"b\"", "default_variant = \"c\"")
        .replace(
            "model = \"b\"",
            "model = \"a\"\nlabel = \"canary\"\nversion = 2",
        )
        .replace("model = \"a\"\nweight = 90", "model = \"ab\"\nweight = 90");
    let reasons = parse_manifest(&text).unwrap().check();
    for want in [
        "cannot route to itself",
        "give a version or a label, not both",
        "default_variant 'c' is not the name of a variant",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "{want}: {reasons:?}"
        );
    }
    let twice = AB
        .replace("model = \"b\"", "model = \"a\"")
        .replace("default_variant = \"b\"", "");
    let reasons = parse_manifest(&twice).unwrap().check();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("the name 'a' appears twice")),
        "{reasons:?}"
    );
    let no_router = AB.replace(
        "[router]\npath = \"plugins/router.wasm\"\nconfig = { shadow = \"b\" }\n",
        "",
    );
    let reasons = parse_manifest(&no_router).unwrap().check();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("needs a [router] section")),
        "{reasons:?}"
    );
    let neither = "[bundle]\nname = \"x\"\nversion = 1\n";
    let reasons = parse_manifest(neither).unwrap().check();
    assert!(
        reasons[0].contains("a [model] section, a [handler]"),
        "{reasons:?}"
    );
    // A handler alone is a model-less bundle; batching it is not.
    let handler = format!("{neither}[handler]\npath = \"plugins/handler.wasm\"\n");
    assert_eq!(
        parse_manifest(&handler).unwrap().check(),
        Vec::<String>::new()
    );
    let batched = format!("{handler}[batching]\nmax_batch_size = 4\n");
    let reasons = parse_manifest(&batched).unwrap().check();
    assert!(
        reasons.iter().any(|r| r.contains("has no [model]")),
        "{reasons:?}"
    );
}

#[test]
fn names_and_devices() {
    assert!(valid_name("resnet18"));
    assert!(valid_name("a.b-c_d"));
    assert!(!valid_name("-a"));
    assert!(valid_name("ResNet50"));
    assert!(!valid_name(".."));
    assert!(!valid_name(""));
    assert_eq!(DeviceSpec::parse("cuda:1"), Ok(DeviceSpec::Cuda(1)));
    assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
    assert!(DeviceSpec::parse("gpu").is_err());
}

#[test]
fn paths_stay_inside() {
    assert!(relative_path("/etc/passwd").is_err());
    assert!(relative_path("a/../../b").is_err());
    assert!(relative_path("model/model.pt").is_ok());
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
    assert!(resolve_inside(dir.path(), "link")
        .unwrap_err()
        .contains("outside"));
}

#[test]
fn tensorflow_models_take_their_defaults_and_torch_keeps_its_rules() {
    let m =
        parse_manifest("[bundle]\nname = \"t\"\nversion = 1\n[model]\nbackend = \"tensorflow\"\n")
            .unwrap();
    let spec = m.model.as_ref().unwrap();
    assert_eq!(spec.path, "model/saved_model");
    assert_eq!(spec.tags(), vec!["serve".to_string()]);
    assert_eq!(spec.signature(), "serving_default");
    // Inputs may come from the signature: no "model.inputs is empty" for tensorflow.
    let reasons = m.check();
    assert!(
        reasons.iter().all(|r| !r.contains("model.inputs is empty")),
        "{reasons:?}"
    );
    let torch = parse_manifest(
        "[bundle]\nname = \"t\"\nversion = 1\n[model]\nbackend = \"torchscript\"\nsignature = \"x\"\ninputs = [{ name = \"i\", dtype = \"fp32\", shape = [-1] }]\n",
    )
    .unwrap()
    .check();
    assert!(
        torch.iter().any(|r| r.contains("model.path is required")),
        "{torch:?}"
    );
    assert!(
        torch
            .iter()
            .any(|r| r.contains("belong to a tensorflow model")),
        "{torch:?}"
    );
}

#[test]
fn a_tf_serving_version_directory_is_a_tensorflow_bundle_named_by_its_directories() {
    let dir = tempfile::tempdir().unwrap();
    let version = dir.path().join("half_plus_two").join("123");
    std::fs::create_dir_all(version.join("variables")).unwrap();
    std::fs::write(version.join("saved_model.pb"), b"x").unwrap();
    assert!(is_version_dir(&version));
    let b = Bundle::open(&version).unwrap();
    assert_eq!((b.name(), b.version()), ("half_plus_two", 123));
    let spec = b.manifest.model.as_ref().unwrap();
    assert_eq!(
        (spec.backend, spec.path.as_str()),
        (BackendKind::Tensorflow, ".")
    );
    // A version directory that is not a number says what the layout is.
    let bad = dir.path().join("half_plus_two").join("latest");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("saved_model.pb"), b"x").unwrap();
    let err = Bundle::open(&bad).unwrap_err().to_string();
    assert!(err.contains("<model>/<version>/saved_model.pb"), "{err}");
    // A bundle.toml beside saved_model.pb wins.
    std::fs::write(version.join("bundle.toml"), "[bundle]\nname = \"half_plus_two\"\nversion = 123\n[model]\nbackend = \"tensorflow\"\npath = \".\"\ntags = [\"serve\", \"gpu\"]\n").unwrap();
    let b = Bundle::open(&version).unwrap();
    assert_eq!(b.manifest.model.unwrap().tags(), vec!["serve", "gpu"]);
}

#[test]
fn a_dependency_names_a_model_and_pins_a_version_or_a_label() {
    use super::{Dependency, Pin};
    let d = Dependency::parse("mlp").unwrap();
    assert_eq!((d.model.as_str(), &d.pin), ("mlp", &Pin::Latest));
    assert_eq!(Dependency::parse("mlp@3").unwrap().pin, Pin::Version(3));
    assert_eq!(
        Dependency::parse("mlp@stable").unwrap().pin,
        Pin::Label("stable".into())
    );
    assert_eq!(
        Dependency::parse("mlp@stable").unwrap().to_string(),
        "mlp@stable"
    );
    for bad in ["", "@3", "mlp@", "../mlp", "mlp@0", "mlp@a/b", "mlp@03"] {
        assert!(Dependency::parse(bad).is_err(), "{bad:?} was accepted");
    }
}
