"""The repository is the source of truth: versions copied in by hand are served once
complete, removed ones are retired, and each model's version policy decides what loads."""
import os
import shutil
import threading
import time

import numpy as np
import requests

from conftest import start_server, stop_server
from test_upload import ROW, TOKEN, auth, expected, mlp_bundle, pack, status


def wait_for(cond, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def predict(s):
    return np.array(requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW}).json()["predictions"])


def test_hand_copied_versions_load_once_complete_and_removed_ones_retire(tmp_path):
    tmp, repo = str(tmp_path), str(tmp_path / "repo")
    shutil.copytree(mlp_bundle(tmp, 1, 0), os.path.join(repo, "mlp", "1"))
    config = tmp_path / "nnserve.toml"
    config.write_text("poll_interval_ms = 300\n")
    s = start_server(repo, tmp, "--config", str(config))
    try:
        # The safe way: copy elsewhere, rename in.
        staged = os.path.join(tmp, "staging-2")
        shutil.copytree(mlp_bundle(tmp, 2, 1), staged)
        os.rename(staged, os.path.join(repo, "mlp", "2"))
        assert wait_for(lambda: status(s) == {"2": "AVAILABLE", "1": "END"}), status(s)
        assert np.allclose(predict(s), expected(mlp_bundle(tmp, 2, 1)), atol=1e-5)

        # A slow copy straight into place is not loaded until it stops changing.
        src = mlp_bundle(tmp, 3, 2)
        dst = os.path.join(repo, "mlp", "3")
        os.makedirs(os.path.join(dst, "model"))
        shutil.copy(os.path.join(src, "bundle.toml"), dst)
        data = open(os.path.join(src, "model", "model.pt"), "rb").read()
        seen = []

        def watch():
            while not done.is_set():
                seen.append(status(s).get("3"))
                time.sleep(0.05)

        done = threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        with open(os.path.join(dst, "model", "model.pt"), "wb") as f:
            step = max(1, len(data) // 20)
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(0.05)
        assert wait_for(lambda: status(s).get("3") == "AVAILABLE"), status(s)
        done.set()
        watcher.join()
        assert "END" not in seen, "a half-copied version was tried"
        assert np.allclose(predict(s), expected(src), atol=1e-5)

        # Removed by hand: retired, and the policy brings the newest remaining back.
        shutil.rmtree(dst)
        assert wait_for(lambda: status(s).get("3") == "END" and status(s).get("2") == "AVAILABLE"), status(s)
        assert np.allclose(predict(s), expected(mlp_bundle(tmp, 2, 1)), atol=1e-5)
    finally:
        stop_server(s)


def test_version_policies_from_the_config_file(tmp_path):
    tmp, repo = str(tmp_path), str(tmp_path / "repo")
    for v, seed in ((1, 0), (2, 1), (3, 2)):
        shutil.copytree(mlp_bundle(tmp, v, seed), os.path.join(repo, "mlp", str(v)))
    for policy, want in (('"all"', {"3": "AVAILABLE", "2": "AVAILABLE", "1": "AVAILABLE"}),
                         ("{ specific = [1, 2] }", {"2": "AVAILABLE", "1": "AVAILABLE"}),
                         ("{ latest = 2 }", {"3": "AVAILABLE", "2": "AVAILABLE"})):
        config = tmp_path / "nnserve.toml"
        config.write_text(f"poll_interval_ms = 0\n[policies]\nmlp = {policy}\n")
        s = start_server(repo, tmp, "--config", str(config))
        try:
            assert status(s) == want, (policy, status(s))
            r = requests.post(f"{s.url}/v1/models/mlp/versions/1:predict", json={"instances": ROW})
            assert r.status_code == (200 if "1" in want else 404)
        finally:
            stop_server(s)
    config.write_text("[policies]\nmlp = { newest = 1 }\n")
    r = __import__("subprocess").run([__import__("conftest").NNSERVE, "serve", "-r", repo, "-l", "127.0.0.1:0",
                                      "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "policies.mlp" in r.stderr


def test_triton_repository_extension_index_load_unload(tmp_path):
    tmp, repo = str(tmp_path), str(tmp_path / "repo")
    shutil.copytree(mlp_bundle(tmp, 1, 0), os.path.join(repo, "mlp", "1"))
    config = tmp_path / "nnserve.toml"
    config.write_text("poll_interval_ms = 200\n")
    s = start_server(repo, tmp, "--config", str(config))
    try:
        index = requests.post(f"{s.url}/v2/repository/index").json()
        assert {"name": "mlp", "version": "1", "state": "READY", "reason": ""} in index
        assert requests.post(f"{s.url}/v2/repository/models/mlp/unload").status_code == 200
        assert wait_for(lambda: status(s) == {"1": "END"})
        time.sleep(0.6)  # the poller must not bring it back
        assert status(s) == {"1": "END"}
        r = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW})
        assert r.status_code == 503
        assert requests.post(f"{s.url}/v2/repository/models/mlp/load").status_code == 200
        assert status(s) == {"1": "AVAILABLE"}
        assert np.allclose(predict(s), expected(mlp_bundle(tmp, 1, 0)), atol=1e-5)
        r = requests.post(f"{s.url}/v2/repository/models/nope/load")
        assert r.status_code == 404 and "not in the repository" in r.json()["error"]
    finally:
        stop_server(s)


def test_a_device_memory_budget_refuses_what_would_not_fit(tmp_path):
    from conftest import heavy_bundle
    tmp, repo = str(tmp_path), str(tmp_path / "repo")
    shutil.copytree(mlp_bundle(tmp, 1, 0), os.path.join(repo, "mlp", "1"))
    heavy_bundle(repo)  # about 33 MB of weights
    config = tmp_path / "nnserve.toml"
    config.write_text("poll_interval_ms = 0\n[device_memory_mib]\ncpu = 8\n")
    s = start_server(repo, tmp, "--config", str(config), "--admin-token", TOKEN)
    try:
        (st,) = requests.get(f"{s.url}/v1/models/heavy").json()["model_version_status"]
        assert st["state"] == "END"
        msg = st["status"]["error_message"]
        assert "heavy@1 needs about" in msg and "device_memory_mib" in msg
        assert "more than its whole budget of 8 MiB" in msg and "raise that budget to at least" in msg
        assert status(s) == {"1": "AVAILABLE"}
        assert requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW}).status_code == 200
        # An upload that does not fit is not an invalid bundle: 409 with the numbers, and
        # nothing stored or recorded for it.
        heavy2 = os.path.join(tmp, "up")
        heavy_bundle(heavy2, name="big")
        archive = pack(os.path.join(heavy2, "big", "1"), os.path.join(tmp, "big.tar.gz"))
        r = requests.post(f"{s.url}/v1/models/big/versions", data=archive, headers=auth())
        assert r.status_code == 409, r.text
        assert "big@1 needs about" in r.json()["error"] and "invalid bundle" not in r.json()["error"]
        assert not os.path.exists(os.path.join(repo, "big"))
        assert requests.get(f"{s.url}/v1/models/big").status_code == 404
        assert requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW}).status_code == 200
    finally:
        stop_server(s)
