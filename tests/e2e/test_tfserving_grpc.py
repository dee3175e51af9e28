"""TensorFlow Serving's own gRPC client (`tensorflow-serving-api`'s PredictionServiceStub
and ModelServiceStub, with `tf.make_tensor_proto`) against nnserve, for a TorchScript and
a TensorFlow model, on a server of this module's own (the version swap changes mlp)."""
import glob
import os
import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
import requests

from conftest import EXAMPLES, NNSERVE, ROOT, start_server, stop_server

if os.environ.get("CI"):
    import tensorflow as tf
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                         predict_pb2, prediction_service_pb2_grpc)
else:
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                         predict_pb2, prediction_service_pb2_grpc)

import torch  # noqa: E402
from test_upload import mlp_bundle, pack  # noqa: E402

X = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], np.float32)


@pytest.fixture(scope="module")
def tfs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tfserving"))
    repo = os.path.join(tmp, "repository")
    os.makedirs(repo)
    shutil.copytree(mlp_bundle(tmp, 1, seed=0), os.path.join(repo, "mlp", "1"))
    for model in ("tf-mlp", "digits"):
        shutil.copytree(os.path.join(EXAMPLES, model), os.path.join(repo, model))
    s = start_server(repo, tmp, "--grpc-listen", "127.0.0.1:0")
    s.tmp = tmp
    with grpc.insecure_channel(s.grpc) as ch:
        s.predict = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        s.models = model_service_pb2_grpc.ModelServiceStub(ch)
        yield s
    stop_server(s)
    assert s.proc.returncode == 0, s.log()


def torch_mlp(version_dir, x):
    m = torch.jit.load(os.path.join(version_dir, "model", "model.pt")).eval()
    return m(torch.from_numpy(x)).detach().numpy()


def predict(s, model, x, name="input", version=None, label=None, output_filter=(), dtype=tf.float32):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    req.inputs[name].CopyFrom(tf.make_tensor_proto(x, dtype=dtype))
    req.output_filter.extend(output_filter)
    return s.predict.Predict(req, timeout=30)


def test_predict_on_torchscript_by_version_and_label(tfs):
    want = torch_mlp(os.path.join(tfs.tmp, "repository", "mlp", "1"), X)
    resp = predict(tfs, "mlp", X)
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["output"]), want, atol=1e-5)
    assert resp.model_spec.name == "mlp" and resp.model_spec.version.value == 1
    resp = predict(tfs, "mlp", X, version=1, output_filter=["output"])
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["output"]), want, atol=1e-5)
    r = requests.put(f"{tfs.url}/v1/models/mlp/labels/stable", json={"version": 1})
    assert r.status_code == 200, r.text
    resp = predict(tfs, "mlp", X, label="stable")
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["output"]), want, atol=1e-5)
    # Typed values instead of tensor_content, and one value filling the shape.
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "mlp"
    t = req.inputs["input"]
    t.dtype = tf.float32.as_datatype_enum
    t.tensor_shape.dim.add(size=2)
    t.tensor_shape.dim.add(size=4)
    t.float_val.extend(X.flatten().tolist())
    np.testing.assert_allclose(tf.make_ndarray(tfs.predict.Predict(req).outputs["output"]), want, atol=1e-5)
    t.ClearField("float_val")
    t.float_val.append(0.5)
    filled = torch_mlp(os.path.join(tfs.tmp, "repository", "mlp", "1"), np.full((2, 4), 0.5, np.float32))
    np.testing.assert_allclose(tf.make_ndarray(tfs.predict.Predict(req).outputs["output"]), filled, atol=1e-5)


def test_predict_on_tensorflow_equals_tensorflow(tfs):
    model = tf.saved_model.load(os.path.join(EXAMPLES, "tf-mlp", "1", "model", "saved_model"))
    fn = model.signatures["serving_default"]
    (in_name,) = fn.structured_input_signature[1].keys()
    (out_name,) = fn.structured_outputs.keys()
    want = fn(**{in_name: tf.constant(X)})[out_name].numpy()
    resp = predict(tfs, "tf-mlp", X, name=in_name)
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs[out_name]), want, atol=1e-5)


def test_get_model_metadata_gives_the_signature(tfs):
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "mlp"
    req.metadata_field.append("signature_def")
    resp = tfs.predict.GetModelMetadata(req, timeout=10)
    assert resp.model_spec.version.value == 1
    sigs = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sigs)
    sig = sigs.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["input"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in sig.inputs["input"].tensor_shape.dim] == [-1, 4]
    assert [d.size for d in sig.outputs["output"].tensor_shape.dim] == [-1, 3]
    # A TensorFlow model's signature comes from its SavedModel.
    req.model_spec.name = "tf-mlp"
    sigs = get_model_metadata_pb2.SignatureDefMap()
    tfs.predict.GetModelMetadata(req, timeout=10).metadata["signature_def"].Unpack(sigs)
    model = tf.saved_model.load(os.path.join(EXAMPLES, "tf-mlp", "1", "model", "saved_model"))
    fn = model.signatures["serving_default"]
    assert set(sigs.signature_def["serving_default"].inputs) == set(fn.structured_input_signature[1])
    assert set(sigs.signature_def["serving_default"].outputs) == set(fn.structured_outputs)
    req.ClearField("metadata_field")
    with pytest.raises(grpc.RpcError) as e:
        tfs.predict.GetModelMetadata(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_digits_through_one_string_input(tfs):
    """A handler plugin's bundle through Predict: one DT_STRING element, the body."""
    png = os.path.join(tfs.tmp, "seven.png")
    subprocess.run([os.sys.executable, os.path.join(ROOT, "examples", "draw_digit.py"), "7", png],
                   check=True, capture_output=True)
    body = open(png, "rb").read()
    direct = requests.post(f"{tfs.url}/v1/models/digits:infer", data=body)
    resp = predict(tfs, "digits", np.array([body], dtype=object), name="request", dtype=tf.string)
    (answer,) = tf.make_ndarray(resp.outputs["body"])
    assert answer == direct.content


def test_errors_as_tf_serving_gives_them(tfs):
    def code(fn):
        with pytest.raises(grpc.RpcError) as e:
            fn()
        return e.value.code(), e.value.details()
    c, _ = code(lambda: predict(tfs, "no-such-model", X))
    assert c == grpc.StatusCode.NOT_FOUND
    c, _ = code(lambda: predict(tfs, "mlp", X, version=9))
    assert c == grpc.StatusCode.NOT_FOUND
    c, _ = code(lambda: predict(tfs, "mlp", X, label="nope"))
    assert c == grpc.StatusCode.NOT_FOUND
    c, m = code(lambda: predict(tfs, "mlp", X, name="wrong"))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "wrong" in m
    c, m = code(lambda: predict(tfs, "mlp", X.astype(np.float64), dtype=tf.float64))
    assert c == grpc.StatusCode.INVALID_ARGUMENT
    c, m = code(lambda: predict(tfs, "mlp", X, output_filter=["nope"]))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "nope" in m
    with grpc.insecure_channel(tfs.grpc) as ch:
        classify = ch.unary_unary("/tensorflow.serving.PredictionService/Classify",
                                  request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            classify(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Predict" in e.value.details()
    # And the server keeps serving.
    assert predict(tfs, "mlp", X).outputs["output"].tensor_shape.dim[0].size == 2


def status_of(tfs, model="mlp"):
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = model
    resp = tfs.models.GetModelStatus(req, timeout=10)
    return {s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
            for s in resp.model_version_status}


def test_get_model_status_through_a_version_swap(tfs):
    assert status_of(tfs) == {1: "AVAILABLE"}
    r = requests.put(f"{tfs.url}/v1/models/mlp/labels/stable", json={"version": 1})
    assert r.status_code == 200, r.text
    v2 = mlp_bundle(tfs.tmp, 2, seed=1)
    archive = pack(v2, os.path.join(tfs.tmp, "mlp-2.tar.gz"))
    r = requests.post(f"{tfs.url}/v1/models/mlp/versions", data=archive)
    assert r.status_code == 201, r.text
    # v1 carries the label `stable`: it stays available until the label moves.
    assert status_of(tfs) == {1: "AVAILABLE", 2: "AVAILABLE"}
    r = requests.put(f"{tfs.url}/v1/models/mlp/labels/stable", json={"version": 2})
    assert r.status_code == 200, r.text
    deadline = time.time() + 15
    while status_of(tfs) != {1: "END", 2: "AVAILABLE"}:
        assert time.time() < deadline, status_of(tfs)
        time.sleep(0.05)  # polling the status a client sees; the retirement ends on its own
    resp = predict(tfs, "mlp", X)
    assert resp.model_spec.version.value == 2
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["output"]), torch_mlp(v2, X), atol=1e-5)
    with pytest.raises(grpc.RpcError) as e:
        status_of(tfs, "no-such-model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_our_protos_match_tensorflow_servings():
    """Every message and field of proto/tensorflow* has the number and type that
    tensorflow-serving-api's and TensorFlow's own descriptors give."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    found = sorted(glob.glob(os.path.join(ROOT, "target", "release", "build", "nnserve-*", "out",
                                          "descriptors.bin")), key=os.path.getmtime)
    assert found
    fds = descriptor_pb2.FileDescriptorSet.FromString(open(found[-1], "rb").read())
    pool = descriptor_pool.Default()
    checked = 0
    for f in fds.file:
        if not f.package.startswith("tensorflow"):
            continue

        def check(msg, prefix):
            nonlocal checked
            full = f"{prefix}.{msg.name}"
            if full.startswith("tensorflow.serving.") and (full.endswith("Request") or full.endswith("Response")) \
                    and not msg.field:
                return  # the unserved RPCs' messages, declared empty
            theirs = pool.FindMessageTypeByName(full)
            for field in msg.field:
                t = theirs.fields_by_name.get(field.name)
                assert t is not None, f"{full}.{field.name}"
                assert (field.number, field.type) == (t.number, t.type), f"{full}.{field.name}"
                checked += 1
            for n in msg.nested_type:
                if not n.options.map_entry:
                    check(n, full)
        for m in f.message_type:
            check(m, f.package)
    assert checked > 40


def test_a_version_that_is_not_available_is_a_failed_precondition(tfs):
    r = requests.post(f"{tfs.url}/v2/repository/models/tf-mlp/unload")
    assert r.status_code == 200, r.text
    try:
        with pytest.raises(grpc.RpcError) as e:
            predict(tfs, "tf-mlp", X)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert status_of(tfs, "tf-mlp") == {1: "END"}
    finally:
        r = requests.post(f"{tfs.url}/v2/repository/models/tf-mlp/load")
        assert r.status_code == 200, r.text
    assert status_of(tfs, "tf-mlp") == {1: "AVAILABLE"}
