"""One owner for a model's life: every trigger (upload, delete, the poller) goes through
the same reconcile, so racing uploads store exactly one content, a deleted serving version
hands over to the next without a failed request, and refused uploads do not pile up."""
import os
import shutil
import threading
import time

import numpy as np
import requests

from conftest import start_server, stop_server
from test_upload import ROW, archive_of, expected, mlp_bundle, pack


class Load:
    """Clients predicting on `path` until stopped; every non-200 answer is kept."""

    def __init__(self, server, path="/v1/models/mlp:predict", clients=3):
        self.stop = threading.Event()
        self.ok, self.failures = 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(server.url + path,)) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def run(self, url):
        deadline = time.time() + 60  # bounded even if a test forgets to stop it
        with requests.Session() as s:
            while not self.stop.is_set() and time.time() < deadline:
                r = s.post(url, json={"instances": ROW})
                with self.lock:
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append((r.status_code, r.text[:200]))

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.ok, self.failures


def versions(server, model="mlp"):
    listing = requests.get(f"{server.url}/v1/models").json()["models"]
    (m,) = [m for m in listing if m["name"] == model]
    return {v["version"]: v for v in m["versions"]}


def test_racing_uploads_of_one_version_store_exactly_one_content(tmp_path):
    """Two uploads of the same version with different content, 20 times: one 201, one 409,
    and the recorded digest is the winner's, which is also what serves (the loser's 500
    "Directory not empty" and its recorded digest are gone)."""
    tmp = str(tmp_path)
    repo = os.path.join(tmp, "repo")
    os.makedirs(repo)
    s = start_server(repo, tmp, "--config", write(tmp_path, "poll_interval_ms = 0\n"))
    try:
        for v in range(1, 21):
            dirs = {seed: mlp_bundle(tmp, v, seed=100 * v + seed) for seed in (1, 2)}
            bodies = {seed: pack(d, os.path.join(tmp, f"race-{v}-{seed}.tar.gz")) for seed, d in dirs.items()}
            answers = {}

            def upload(seed):
                answers[seed] = requests.post(f"{s.url}/v1/models/mlp/versions", data=bodies[seed])

            threads = [threading.Thread(target=upload, args=(seed,)) for seed in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = sorted(a.status_code for a in answers.values())
            assert codes == [201, 409], {k: (a.status_code, a.text) for k, a in answers.items()}
            (winner,) = [seed for seed, a in answers.items() if a.status_code == 201]
            digest = answers[winner].json()["digest"]
            assert versions(s)[str(v)]["digest"] == digest, f"round {v}"
            r = requests.post(f"{s.url}/v1/models/mlp/versions/{v}:predict", json={"instances": ROW})
            assert r.status_code == 200, r.text
            assert np.allclose(r.json()["predictions"], expected(dirs[winner]), atol=1e-5), f"round {v}"
            # The loser's content is refused again, the winner's accepted as stored.
            loser = 3 - winner
            again = requests.post(f"{s.url}/v1/models/mlp/versions", data=bodies[loser])
            assert again.status_code == 409, again.text
            again = requests.post(f"{s.url}/v1/models/mlp/versions", data=bodies[winner])
            assert again.status_code == 200, again.text
    finally:
        stop_server(s)


def write(tmp_path, text):
    path = tmp_path / "nnserve.toml"
    path.write_text(text)
    return str(path)


def two_versions(tmp_path):
    tmp = str(tmp_path)
    repo = os.path.join(tmp, "repo")
    for v in (1, 2):
        shutil.copytree(mlp_bundle(tmp, v, seed=v), os.path.join(repo, "mlp", str(v)))
    return tmp, repo


def test_deleting_the_serving_version_hands_over_without_a_503_with_polling_off(tmp_path):
    tmp, repo = two_versions(tmp_path)
    s = start_server(repo, tmp, "--config", write(tmp_path, "poll_interval_ms = 0\n"))
    try:
        assert {v: x["state"] for v, x in versions(s).items()} == {"2": "AVAILABLE"}
        # A version copied in by hand gets the record an upload writes, once it loads.
        assert versions(s)["2"]["digest"].startswith("sha256:"), versions(s)
        load = Load(s)
        time.sleep(0.3)
        r = requests.delete(f"{s.url}/v1/models/mlp/versions/2")
        assert r.status_code == 200, r.text
        time.sleep(0.3)
        ok, failures = load.finish()
        assert failures == [], failures[:3]
        assert ok > 20
        states = {v: x["state"] for v, x in versions(s).items()}
        assert states["1"] == "AVAILABLE" and states["2"] in ("UNLOADING", "END"), states
        r = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW})
        assert r.status_code == 200 and r.headers["x-nnserve-variant"] == "mlp@1"
        assert not os.path.exists(os.path.join(repo, "mlp", "2"))
    finally:
        stop_server(s)


def test_a_serving_version_removed_by_hand_hands_over_without_a_503(tmp_path):
    tmp, repo = two_versions(tmp_path)
    s = start_server(repo, tmp, "--config", write(tmp_path, "poll_interval_ms = 100\n"))
    try:
        load = Load(s)
        time.sleep(0.3)
        shutil.rmtree(os.path.join(repo, "mlp", "2"))
        deadline = time.time() + 20
        while versions(s).get("1", {}).get("state") != "AVAILABLE" and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        ok, failures = load.finish()
        assert versions(s)["1"]["state"] == "AVAILABLE"
        assert failures == [], failures[:3]
        assert ok > 20
    finally:
        stop_server(s)


def test_refused_uploads_keep_a_bounded_history(tmp_path):
    """Each refused upload used to stay in the registry, the status answer and /metrics for
    good (500 of them: a 2 MB status answer and 500 more series); now the newest 10 stay."""
    tmp, repo = two_versions(tmp_path)
    s = start_server(repo, tmp, "--config", write(tmp_path, "poll_interval_ms = 0\n"))
    try:
        good = mlp_bundle(tmp, 1, seed=1)
        manifest = open(os.path.join(good, "bundle.toml")).read()
        for v in range(100, 140):
            body = archive_of({
                "bundle.toml": manifest.replace("version = 1", f"version = {v}").encode(),
                "model/model.pt": b"not torchscript",
            })
            r = requests.post(f"{s.url}/v1/models/mlp/versions", data=body)
            assert r.status_code == 400 and "does not load" in r.text, r.text
        listed = versions(s)
        refused = sorted(int(v) for v, x in listed.items() if x["error"])
        assert refused == list(range(130, 140)), refused
        status = requests.get(f"{s.url}/v1/models/mlp").json()["model_version_status"]
        assert len(status) == 1 + 10, status
        series = [l for l in requests.get(f"{s.url}/metrics").text.splitlines()
                  if l.startswith("nnserve_versions{") and 'model="mlp"' in l]
        assert len(series) == 1 + 10, series
        r = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW})
        assert r.status_code == 200 and r.headers["x-nnserve-variant"] == "mlp@2"
    finally:
        stop_server(s)


def test_an_upload_to_an_unloaded_model_is_stored_not_served(tmp_path):
    """The upload path goes through the same reconcile as every other trigger: after
    Triton's unload, an upload is stored but serves only once the model is loaded again
    (the upload path used to publish it whatever the model's state)."""
    tmp, repo = two_versions(tmp_path)
    s = start_server(repo, tmp, "--config", write(tmp_path, "poll_interval_ms = 0\n"))
    try:
        assert requests.post(f"{s.url}/v2/repository/models/mlp/unload").status_code == 200
        archive = pack(mlp_bundle(tmp, 3, seed=3), os.path.join(tmp, "mlp-3.tar.gz"))
        r = requests.post(f"{s.url}/v1/models/mlp/versions", data=archive)
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "END" and "unloaded" in r.json()["note"], r.text
        r = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW})
        assert r.status_code == 503, r.text
        assert requests.post(f"{s.url}/v2/repository/models/mlp/load").status_code == 200
        r = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW})
        assert r.status_code == 200 and r.headers["x-nnserve-variant"] == "mlp@3", r.text
    finally:
        stop_server(s)
