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
