"""A user sends tensors to the `mlp` model over TF Serving REST and KServe v2 (JSON and
binary) and gets what torch.jit.load gives in-process."""
import os

import numpy as np
import pytest
import torch

from conftest import EXAMPLES

MODEL = os.path.join(EXAMPLES, "mlp", "1", "model", "model.pt")


@pytest.fixture(scope="module")
def torch_mlp():
    m = torch.jit.load(MODEL)
    m.eval()
    return lambda x: m(torch.from_numpy(x)).detach().numpy()


def rows(n, seed=0):
    return np.random.default_rng(seed + n).normal(size=(n, 4)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 5, 32])
def test_predict_row_format(server, http, torch_mlp, n):
    x = rows(n)
    r = http.post(f"{server.url}/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["predictions"], dtype=np.float32)
    np.testing.assert_allclose(got, torch_mlp(x), atol=1e-5)


@pytest.mark.parametrize("n", [1, 7])
def test_predict_columnar_format_and_explicit_version(server, http, torch_mlp, n):
    x = rows(n)
    r = http.post(f"{server.url}/v1/models/mlp/versions/1:predict", json={"inputs": {"input": x.tolist()}})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"]), torch_mlp(x), atol=1e-5)
    r = http.post(f"{server.url}/v1/models/mlp:predict", json={"inputs": x.tolist()})
    np.testing.assert_allclose(np.array(r.json()["outputs"]), torch_mlp(x), atol=1e-5)


@pytest.mark.parametrize("n", [1, 6])
def test_v2_json_flat_and_nested(server, http, torch_mlp, n):
    x = rows(n)
    for data in (x.ravel().tolist(), x.tolist()):
        body = {"id": "req-42", "inputs": [{"name": "input", "shape": [n, 4], "datatype": "FP32", "data": data}]}
        r = http.post(f"{server.url}/v2/models/mlp/infer", json=body)
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["id"] == "req-42" and j["model_name"] == "mlp" and j["model_version"] == "1"
        (out,) = j["outputs"]
        assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [n, 3]
        np.testing.assert_allclose(np.array(out["data"]).reshape(n, 3), torch_mlp(x), atol=1e-5)


def test_v2_requested_outputs_are_honoured(server, http):
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}],
            "outputs": [{"name": "nope"}]}
    r = http.post(f"{server.url}/v2/models/mlp/versions/1/infer", json=body)
    assert r.status_code == 400 and 'requested output "nope"' in r.json()["error"]


def test_status_and_metadata(server, http):
    r = http.get(f"{server.url}/v1/models/mlp")
    assert r.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    sig = http.get(f"{server.url}/v1/models/mlp/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert sig["serving_default"]["inputs"]["input"]["dtype"] == "DT_FLOAT"
    assert http.get(f"{server.url}/v2").json()["name"] == "nnserve"
    assert http.get(f"{server.url}/v2/health/live").status_code == 200
    assert http.get(f"{server.url}/v2/health/ready").status_code == 200
    assert http.get(f"{server.url}/v2/models/mlp/versions/1/ready").status_code == 200
    meta = http.get(f"{server.url}/v2/models/mlp/versions/1").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
