"""Labels route by name and keep their version loaded; they survive a restart; deleting a
version takes it out of service; GET /v1/models lists everything."""
import os
import time
import shutil

import numpy as np
import pytest
import requests

from conftest import start_server, stop_server
from test_upload import ROW, expected, mlp_bundle, pack, status


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("labels"))
    repo = os.path.join(tmp, "repository")
    for v, seed in ((1, 0), (2, 1)):
        shutil.copytree(mlp_bundle(tmp, v, seed), os.path.join(repo, "mlp", str(v)))
    return tmp, repo


def predict(server, path):
    r = requests.post(f"{server.url}/v1/models/mlp{path}:predict", json={"instances": ROW})
    assert r.status_code == 200, r.text
    return np.array(r.json()["predictions"])


def test_labels_route_persist_and_guard_deletes(setup):
    tmp, repo = setup
    out = {v: expected(mlp_bundle(tmp, v, seed)) for v, seed in ((1, 0), (2, 1), (3, 2))}
    s = start_server(repo, tmp)
    try:
        assert status(s) == {"2": "AVAILABLE"}, "latest_versions = 1 loads only the newest"
        r = requests.put(f"{s.url}/v1/models/mlp/labels/stable", json={"version": 1})
        assert r.status_code == 409 and "not AVAILABLE" in r.json()["error"]
        assert requests.put(f"{s.url}/v1/models/mlp/labels/canary", json={"version": 2}).status_code == 200
        assert np.allclose(predict(s, "/labels/canary"), out[2], atol=1e-5)
        r = requests.post(f"{s.url}/v1/models/mlp/labels/nope:predict", json={"instances": ROW})
        assert r.status_code == 404 and "label 'nope' is not assigned" in r.json()["error"]
        # The status by label is the labelled version's alone (it listed every version).
        r = requests.get(f"{s.url}/v1/models/mlp/labels/canary")
        assert [v["version"] for v in r.json()["model_version_status"]] == ["2"], r.text
        assert requests.get(f"{s.url}/v1/models/mlp/labels/nope").status_code == 404
        # Label errors say what is wrong, with the status that fits (not "invalid bundle").
        r = requests.put(f"{s.url}/v1/models/mlp/labels/Bad!", json={"version": 2})
        assert r.status_code == 400 and "is not valid" in r.json()["error"], r.text
        assert "invalid bundle" not in r.json()["error"]
        r = requests.put(f"{s.url}/v1/models/nope/labels/x", json={"version": 1})
        assert r.status_code == 404 and "model 'nope' is not found" in r.json()["error"], r.text
        r = requests.put(f"{s.url}/v1/models/mlp/labels/x", json={"version": 99, "force": True})
        assert r.status_code == 404 and "version 99 of 'mlp' is not stored" in r.json()["error"], r.text

        # A new version: the labelled v2 stays loaded whatever the policy says.
        archive = pack(mlp_bundle(tmp, 3, seed=2), os.path.join(tmp, "mlp-3.tar.gz"))
        assert requests.post(f"{s.url}/v1/models/mlp/versions", data=archive).status_code == 201
        assert status(s) == {"3": "AVAILABLE", "2": "AVAILABLE"}
        assert np.allclose(predict(s, ""), out[3], atol=1e-5)
        assert requests.put(f"{s.url}/v1/models/mlp/labels/stable", json={"version": 3}).status_code == 200
    finally:
        stop_server(s)

    s = start_server(repo, tmp)
    try:
        assert np.allclose(predict(s, "/labels/stable"), out[3], atol=1e-5)
        assert np.allclose(predict(s, "/labels/canary"), out[2], atol=1e-5)
        r = requests.delete(f"{s.url}/v1/models/mlp/versions/2")
        assert r.status_code == 409 and "label 'canary'" in r.json()["error"]
        assert requests.put(f"{s.url}/v1/models/mlp/labels/canary", json={"version": 3}).status_code == 200
        assert requests.delete(f"{s.url}/v1/models/mlp/versions/2").status_code == 200
        assert not os.path.exists(os.path.join(repo, "mlp", "2"))
        assert requests.delete(f"{s.url}/v1/models/mlp/versions/2").status_code == 404
        # A deleted version is UNLOADING until the requests that hold it finish (the
        # retire task sees that within milliseconds, later on a loaded machine), then END.
        deadline = time.time() + 10
        while True:
            listing = requests.get(f"{s.url}/v1/models").json()["models"]
            (mlp,) = [m for m in listing if m["name"] == "mlp"]
            states = {v["version"]: (v["state"], v["digest"]) for v in mlp["versions"]}
            if states["2"][0] != "UNLOADING" or time.time() > deadline:
                break
            time.sleep(0.01)
        assert mlp["labels"] == {"canary": 3, "stable": 3}
        assert states["3"][0] == "AVAILABLE" and states["3"][1].startswith("sha256:")
        assert states["2"][0] == "END"
    finally:
        stop_server(s)
