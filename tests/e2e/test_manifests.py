"""Offline validation of the deploy/ manifests (docs/kubernetes.md); no server, no cluster.

- KServe objects (deploy/kserve/*.yaml): validated with the PyPI `jsonschema` package
  (Draft 4 validator, which OpenAPI v3 schemas are close to) against the OpenAPI v3 schemas
  of KServe's own CRDs, vendored in deploy/schemas/kserve/ by deploy/schemas/vendor.py
  (deploy/schemas/README.md names the kserve commit). Strictly: Kubernetes prunes unknown
  fields of a custom resource silently, so every object schema that lists `properties`,
  has no `additionalProperties` and no `x-kubernetes-preserve-unknown-fields` gets
  `additionalProperties: false` here, and a misspelled field is an error. `metadata`
  (which CRD schemas leave open) is checked by hand: a dict with a DNS-1123 name.
- Core objects (Deployment, Service, HorizontalPodAutoscaler, Secret): validated with the
  PyPI `kubernetes-validate` package (its bundled Kubernetes JSON schemas, offline),
  `kubernetes_validate.validate(doc, K8S_VERSION, strict=True)` with K8S_VERSION = 1.33;
  strict rejects unknown fields.
- A document of a kind with no schema fails. Negative cases (misspelled fields, wrong
  types, a missing required field, an unknown kind) must be rejected by the same calls.
- Every `--flag` in a container's args, and every NNSERVE_* variable in its env, must be
  one that `nnserve serve --help` lists (the release binary; skipped without it).
- Cross-references: Service selector and HPA target against the Deployment, volumes and
  Secrets, drain + grace against terminationGracePeriodSeconds, InferenceServices
  against the runtime's model formats and protocols.
"""
import copy
import functools
import glob
import json
import os
import re
import subprocess
import sys

import pytest

# Installed by `make setup` (scripts/requirements.txt): a missing one fails, never skips.
import jsonschema  # noqa: E402
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
SCHEMAS = os.path.join(DEPLOY, "schemas", "kserve")
NNSERVE = os.environ.get("NNSERVE_BIN") or os.path.join(ROOT, "target", "release", "nnserve")
# The Kubernetes version the core objects are checked against (kubernetes-validate ships
# schemas per version; the manifests use nothing newer than autoscaling/v2, 1.23).
K8S_VERSION = "1.33"
KSERVE_GROUP = "serving.kserve.io"
# The files that hold Kubernetes objects (deploy/prometheus-adapter holds Helm values).
MANIFEST_GLOBS = ("kubernetes/**/*.yaml", "kserve/**/*.yaml")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def manifest_files():
    files = set()
    for g in MANIFEST_GLOBS:
        files.update(glob.glob(os.path.join(DEPLOY, g), recursive=True))
    return sorted(files)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@functools.lru_cache(maxsize=None)
def all_docs():
    """[(id, doc)] for every object in every manifest file."""
    out = []
    for path in manifest_files():
        for i, doc in enumerate(load(path)):
            kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
            name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc, dict) else "?"
            out.append((f"{os.path.relpath(path, DEPLOY)}#{i}:{kind}/{name}", doc))
    return out


def docs_of(kind):
    return [d for _, d in all_docs() if d.get("kind") == kind]


# --- strict schemas -----------------------------------------------------------------

def strict(schema):
    """A copy of an OpenAPI v3 schema in which object schemas with `properties` and
    neither `additionalProperties` nor x-kubernetes-preserve-unknown-fields reject
    unknown fields, as Kubernetes would prune them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def kserve_validators():
    """{(apiVersion, kind): validator} from the vendored schemas."""
    out = {}
    for path in sorted(glob.glob(os.path.join(SCHEMAS, "*.json"))):
        with open(path) as f:
            schema = json.load(f)
        ident = schema.pop("x-nnserve-vendored")
        out[(ident["apiVersion"], ident["kind"])] = jsonschema.Draft4Validator(strict(schema))
    return out


class ManifestError(Exception):
    pass


def check_metadata(doc):
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ManifestError("metadata is not a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not DNS1123.match(name) or len(name) > 63:
        raise ManifestError(f"metadata.name {name!r} is not a DNS-1123 label")
    unknown = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        raise ManifestError(f"metadata has unexpected fields {sorted(unknown)}")
    for field in ("labels", "annotations"):
        m = meta.get(field, {})
        if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in m.items()):
            raise ManifestError(f"metadata.{field} must map strings to strings")


def validate(doc):
    """Raises ManifestError (or a jsonschema / kubernetes_validate error) for an invalid
    object, or for one of a kind there is no schema for."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        raise ManifestError("not a Kubernetes object (apiVersion and kind)")
    check_metadata(doc)
    api_version, kind = doc["apiVersion"], doc["kind"]
    if api_version.split("/")[0] == KSERVE_GROUP:
        validator = kserve_validators().get((api_version, kind))
        if validator is None:
            raise ManifestError(f"no vendored schema for {api_version} {kind}")
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            raise ManifestError("; ".join(
                f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in errors[:5]))
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ManifestError(e.message)
    except kubernetes_validate.ValidationError as e:
        raise ManifestError(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message} "
                            f"(Kubernetes {e.version})")


# --- the manifests are valid ---------------------------------------------------------

def test_manifests_exist():
    files = [os.path.relpath(p, DEPLOY) for p in manifest_files()]
    for expected in ("kubernetes/nnserve.yaml", "kserve/servingruntime.yaml",
                     "kserve/inferenceservice.yaml"):
        assert expected in files
    kinds = {d["kind"] for _, d in all_docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret",
            "ClusterServingRuntime", "InferenceService"} <= kinds


def test_vendored_schemas():
    assert set(kserve_validators()) == {
        (f"{KSERVE_GROUP}/v1alpha1", "ServingRuntime"),
        (f"{KSERVE_GROUP}/v1alpha1", "ClusterServingRuntime"),
        (f"{KSERVE_GROUP}/v1beta1", "InferenceService"),
    }


@pytest.mark.parametrize("ident", [i for i, _ in all_docs()])
def test_manifest_is_valid(ident):
    doc = dict(all_docs())[ident]
    validate(doc)


# --- and the validators are strict: broken copies are rejected ----------------------

def first(kind, name=None):
    for d in docs_of(kind):
        if name is None or d["metadata"]["name"] == name:
            return copy.deepcopy(d)
    raise AssertionError(f"no {kind} {name or ''} in deploy/")


def runtime_misspelled(d):
    d["spec"]["protocolVersion"] = d["spec"].pop("protocolVersions")


def runtime_priority_string(d):
    d["spec"]["supportedModelFormats"][0]["priority"] = "1"


def runtime_format_without_name(d):
    del d["spec"]["supportedModelFormats"][0]["name"]


def runtime_container_typo(d):
    d["spec"]["containers"][0]["readinesProbe"] = d["spec"]["containers"][0].pop("readinessProbe")


def runtime_args_boolean(d):
    d["spec"]["containers"][0]["args"].append(False)   # what an unquoted `off` becomes


def isvc_storage_uri_typo(d):
    m = d["spec"]["predictor"]["model"]
    m["storageURI"] = m.pop("storageUri")


def isvc_port_string(d):
    d["spec"]["predictor"]["model"]["ports"] = [{"name": "h2c", "containerPort": "9000"}]


def isvc_format_typo(d):
    d["spec"]["predictor"]["model"]["modelFormat"] = {"nmae": "pytorch"}


def deployment_field_typo(d):
    s = d["spec"]["template"]["spec"]
    s["terminationGracePeriod"] = s.pop("terminationGracePeriodSeconds")


def deployment_replicas_string(d):
    d["spec"]["replicas"] = "2"


def deployment_probe_typo(d):
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["livenessProbe"]["httpGet"]["paht"] = c["livenessProbe"]["httpGet"].pop("path")


def deployment_args_boolean(d):
    d["spec"]["template"]["spec"]["containers"][0]["args"].append(False)


def service_port_typo(d):
    d["spec"]["ports"][0]["targetPorts"] = d["spec"]["ports"][0].pop("targetPort")


def hpa_target_typo(d):
    t = d["spec"]["metrics"][0]["pods"]["target"]
    t["averagevalue"] = t.pop("averageValue")


def secret_data_number(d):
    d["stringData"] = {"token": 42}


def unknown_kind(d):
    d["kind"] = "ServingRunTime"


def metadata_without_name(d):
    del d["metadata"]["name"]


def metadata_bad_name(d):
    d["metadata"]["name"] = "Kserve_NNServe"


BROKEN = [
    ("ClusterServingRuntime", runtime_misspelled),
    ("ClusterServingRuntime", runtime_priority_string),
    ("ClusterServingRuntime", runtime_format_without_name),
    ("ClusterServingRuntime", runtime_container_typo),
    ("ClusterServingRuntime", runtime_args_boolean),
    ("ClusterServingRuntime", unknown_kind),
    ("ClusterServingRuntime", metadata_bad_name),
    ("InferenceService", isvc_storage_uri_typo),
    ("InferenceService", isvc_port_string),
    ("InferenceService", isvc_format_typo),
    ("InferenceService", metadata_without_name),
    ("Deployment", deployment_field_typo),
    ("Deployment", deployment_replicas_string),
    ("Deployment", deployment_probe_typo),
    ("Deployment", deployment_args_boolean),
    ("Service", service_port_typo),
    ("HorizontalPodAutoscaler", hpa_target_typo),
    ("Secret", secret_data_number),
    ("Deployment", unknown_kind),
]


@pytest.mark.parametrize("kind,breakage", BROKEN,
                         ids=[f"{k}-{b.__name__}" for k, b in BROKEN])
def test_broken_copy_is_rejected(kind, breakage):
    doc = first(kind)
    validate(copy.deepcopy(doc))          # the original passes...
    breakage(doc)
    with pytest.raises(ManifestError) as e:
        validate(doc)                     # ...and the broken copy does not
    print(f"{kind} {breakage.__name__}: {e.value}")


def test_strict_keeps_open_maps_open():
    """strict() adds additionalProperties only where a schema lists properties: labels,
    annotations, resources and preserve-unknown-fields objects stay open."""
    d = first("ClusterServingRuntime")
    d["spec"]["annotations"]["any.example.com/key"] = "value"
    d["spec"]["containers"][0]["resources"]["limits"]["example.com/gpu"] = "1"
    validate(d)


# --- flags and variables the server knows --------------------------------------------

def containers():
    """(where, container) for each container of each object that has some."""
    out = []
    for ident, d in all_docs():
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec)
        for c in pod.get("containers", []) or []:
            out.append((f"{ident}/{c.get('name')}", c))
        pred = spec.get("predictor", {})
        if isinstance(pred.get("model"), dict):
            out.append((f"{ident}/predictor.model", pred["model"]))
    return out


@functools.lru_cache(maxsize=None)
def serve_help():
    if not os.path.exists(NNSERVE):
        pytest.skip(f"{NNSERVE} is not built (`make build`; `make test` builds it): "
                    "the manifests' flags are not checked against it")
    return subprocess.run([NNSERVE, "serve", "--help"], check=True, capture_output=True,
                          text=True, timeout=30).stdout


def test_args_are_strings():
    for where, c in containers():
        for a in c.get("args", []) + c.get("command", []):
            assert isinstance(a, str), f"{where}: arg {a!r} is not a string (quote it in YAML)"


def test_flags_are_known_to_the_server():
    text = serve_help()
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    envs = set(re.findall(r"\[env: ([A-Z0-9_]+)", text))
    unknown = []
    for where, c in containers():
        for a in c.get("args", []):
            if a.startswith("--"):
                flag = a.split("=", 1)[0]
                if flag not in known:
                    unknown.append(f"{where}: {flag}")
        for e in c.get("env", []):
            if e["name"].startswith("NNSERVE_") and e["name"] not in envs:
                unknown.append(f"{where}: env {e['name']}")
    assert not unknown, (f"not in `{os.path.relpath(NNSERVE, ROOT)} serve --help` "
                         f"(a stale build?): {unknown}")


# --- cross-references ----------------------------------------------------------------

def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_deployments():
    deps = docs_of("Deployment")
    secrets = {d["metadata"]["name"]: d for d in docs_of("Secret")}
    services = docs_of("Service")
    assert deps
    for d in deps:
        tpl = d["spec"]["template"]
        labels = tpl["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = tpl["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        args = c["args"]
        drain = int(arg_value(args, "--drain-seconds") or 0)
        grace = int(arg_value(args, "--grace-seconds") or 10)
        assert pod["terminationGracePeriodSeconds"] > drain + grace
        assert (arg_value(args, "--management") == "off") != bool(arg_value(args, "--admin-token-file"))
        if (arg_value(args, "--repository") or "").startswith("s3://"):
            cache = arg_value(args, "--cache-dir")
            assert cache, "an s3:// repository with a read-only root needs --cache-dir"
            assert any(m["mountPath"] == cache for m in c["volumeMounts"])
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
        token = arg_value(args, "--admin-token-file")
        if token:
            mount = next(m for m in c["volumeMounts"] if token.startswith(m["mountPath"] + "/"))
            secret = volumes[mount["name"]]["secret"]
            assert secret["secretName"] in secrets
            assert os.path.basename(token) in [i["path"] for i in secret["items"]]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                s = secrets[ref["name"]]
                assert ref["key"] in {**s.get("data", {}), **s.get("stringData", {})}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8080, "grpc": 8081}
        assert arg_value(args, "--listen").endswith(":8080")
        assert arg_value(args, "--grpc-listen").endswith(":8081")
        ann = tpl["metadata"]["annotations"]
        assert ann["prometheus.io/port"] == "8080" and ann["prometheus.io/path"] == "/metrics"
        for s in services:
            assert s["spec"]["selector"].items() <= labels.items()
            for p in s["spec"]["ports"]:
                assert p["targetPort"] in ports


def test_hpa():
    names = {d["metadata"]["name"] for d in docs_of("Deployment")}
    (hpa,) = docs_of("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in names
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == "nnserve_queue_depth"


def test_inferenceservices_match_the_runtime():
    runtimes = {d["metadata"]["name"]: d for d in docs_of("ClusterServingRuntime")}
    assert "kserve-nnserve" in runtimes
    for r in runtimes.values():
        (c,) = r["spec"]["containers"]
        assert c["name"] == "kserve-container"
        assert arg_value(c["args"], "--repository") == "/mnt/models"
        assert arg_value(c["args"], "--model-name") == "{{.Name}}"
        assert arg_value(c["args"], "--management") == "off"
    isvcs = docs_of("InferenceService")
    assert {i["spec"]["predictor"]["model"]["modelFormat"]["name"] for i in isvcs} >= {
        "nnserve", "pytorch", "tensorflow"}
    for i in isvcs:
        m = i["spec"]["predictor"]["model"]
        r = runtimes[m["runtime"]]["spec"]
        assert m["modelFormat"]["name"] in {f["name"] for f in r["supportedModelFormats"]}
        assert m.get("protocolVersion", "v1") in r["protocolVersions"]
        assert re.match(r"^(s3|gs|https?|pvc|hf|oci)://", m["storageUri"])
        if m["modelFormat"]["name"] == "pytorch":
            given = [a for a in m.get("args", []) if a.startswith(("--input", "--output"))]
            env = {e["name"] for e in m.get("env", [])}
            assert given or {"NNSERVE_INPUTS", "NNSERVE_OUTPUTS"} <= env, \
                f"{i['metadata']['name']}: a bare TorchScript file needs its inputs and outputs"
        if m.get("protocolVersion", "").startswith("grpc"):
            c = runtimes[m["runtime"]]["spec"]["containers"][0]
            grpc_port = int(arg_value(c["args"], "--grpc-listen").rsplit(":", 1)[1])
            assert m["ports"][0] == {"name": "h2c", "containerPort": grpc_port, "protocol": "TCP"}


def test_vendor_script(tmp_path):
    """deploy/schemas/vendor.py extracts each served version of a CRD."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.com"},
        "spec": {"group": "example.com", "names": {"kind": "Thing"}, "versions": [
            {"name": "v1", "served": True,
             "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object"}}}}},
            {"name": "v0", "served": False, "schema": {"openAPIV3Schema": {"type": "object"}}},
        ]},
    }
    src = tmp_path / "crd.yaml"
    src.write_text(yaml.safe_dump(crd))
    subprocess.run([sys.executable, os.path.join(DEPLOY, "schemas", "vendor.py"), str(src),
                    "--out", str(tmp_path / "out")], check=True, capture_output=True)
    assert os.listdir(tmp_path / "out") == ["thing-v1.json"]
    got = json.loads((tmp_path / "out" / "thing-v1.json").read_text())
    assert got["x-nnserve-vendored"] == {"apiVersion": "example.com/v1", "kind": "Thing"}
