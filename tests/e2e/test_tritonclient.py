"""Triton's own client, unchanged, with its defaults (binary tensors) and with JSON."""
import os

import numpy as np
import pytest

from test_tensor_api import rows, torch_mlp  # noqa: F401  (fixture)

# Installed by `make test` (scripts/requirements.txt); absent only on machines that run
# the suite against another build, such as a lent GPU machine.
# In CI a missing client is a failure, not a skip.
if os.environ.get("CI"):
    import tritonclient.http as triton
else:
    triton = pytest.importorskip("tritonclient.http")


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("n", [1, 9])
def test_tritonclient_with_its_defaults_and_with_json(server, torch_mlp, binary, n):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"][0]["name"] == "input" and meta["outputs"][0]["datatype"] == "FP32"
    x = rows(n, seed=3)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("output", binary_data=binary)
    result = client.infer("mlp", [inp], outputs=[out], request_id="abc")
    np.testing.assert_allclose(result.as_numpy("output"), torch_mlp(x), atol=1e-5)
    assert result.get_response()["id"] == "abc"
    # No outputs named: tritonclient asks for all, as binary.
    result = client.infer("mlp", [inp])
    np.testing.assert_allclose(result.as_numpy("output"), torch_mlp(x), atol=1e-5)


def test_a_handler_plugin_through_a_bytes_input_over_http(server):
    """v2 `infer` with one BYTES input calls a bundle's handler plugin with that element
    as the request body, in JSON (a string) and in binary; the answer is the BYTES output
    `body` (docs/http-api.md)."""
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    for binary in (False, True):
        inp = triton.InferInput("request", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hello, plugin"], dtype=np.object_), binary_data=binary)
        out = triton.InferRequestedOutput("body", binary_data=binary)
        result = client.infer("echo", [inp], outputs=[out], request_id="b1")
        got = [v.encode() if isinstance(v, str) else v for v in result.as_numpy("body")]
        assert got == [b"hello, plugin"]  # JSON answers come back as str
        assert result.get_response()["id"] == "b1"
    # The same as plain JSON, as any HTTP client sends it.
    import requests
    r = requests.post(f"{server.url}/v2/models/echo/infer", json={"inputs": [
        {"name": "request", "shape": [1], "datatype": "BYTES", "data": ["plain text"],
         "parameters": {"content_type": "text/plain"}}]})
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert output["name"] == "body" and output["datatype"] == "BYTES" and output["data"] == ["plain text"]
    # Two elements, or numbers, are refused with the reason.
    r = requests.post(f"{server.url}/v2/models/echo/infer", json={"inputs": [
        {"name": "request", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]})
    assert r.status_code == 400 and "holds 2 elements" in r.json()["error"]
    r = requests.post(f"{server.url}/v2/models/echo/infer", json={"inputs": [
        {"name": "request", "shape": [1], "datatype": "BYTES", "data": [1]}]})
    assert r.status_code == 400 and "must be strings" in r.json()["error"]
    # BYTES to a model without a handler plugin: a clear refusal.
    r = requests.post(f"{server.url}/v2/models/mlp/infer", json={"inputs": [
        {"name": "input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
    assert r.status_code == 400 and "BYTES" in r.json()["error"], r.text


def test_digits_png_through_bytes_over_http_equals_its_infer_route(server):
    from test_digits import encode, render
    import digits_data
    import requests
    (_, _), (x, _) = digits_data.split()
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    for i in range(4):
        body = encode(render(x[i], i), "PNG")
        direct = requests.post(f"{server.url}/v1/models/digits:infer", data=body,
                               headers={"content-type": "image/png"})
        inp = triton.InferInput("request", [1], "BYTES")
        inp.set_data_from_numpy(np.array([body], dtype=np.object_), binary_data=True)
        result = client.infer("digits", [inp])
        assert result.as_numpy("body")[0] == direct.content
