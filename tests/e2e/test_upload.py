"""A user uploads new versions of a model to a live server: the new version takes over
without a failed request, the old one is retired, uploads are atomic, idempotent,
guarded by the admin token, and survive a restart."""
import io
import re
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import requests
import torch

from conftest import EXAMPLES, NNSERVE, ROOT, start_server, stop_server

sys.path.insert(0, os.path.join(ROOT, "examples"))
import make_models  # noqa: E402

TOKEN = "s3cret"
ROW = [[1.0, 2.0, 3.0, 4.0]]


def mlp_bundle(tmp, version, seed):
    """An mlp bundle directory of the given version with seeded weights."""
    d = os.path.join(tmp, f"src-{version}-{seed}")
    make_models.make_mlp(d, seed=seed, version=version, name="mlp")
    bundle = os.path.join(d, "mlp", str(version))
    with open(os.path.join(EXAMPLES, "mlp", "1", "bundle.toml")) as f:
        text = f.read().replace("version = 1", f"version = {version}")
    with open(os.path.join(bundle, "bundle.toml"), "w") as f:
        f.write(text)
    return bundle


def pack(bundle, out):
    r = subprocess.run([NNSERVE, "bundle", "pack", bundle, "-o", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return open(out, "rb").read()


def expected(bundle):
    m = torch.jit.load(os.path.join(bundle, "model", "model.pt")).eval()
    return m(torch.tensor(ROW)).detach().numpy()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("upload"))
    repo = os.path.join(tmp, "repository")
    os.makedirs(repo)
    shutil.copytree(mlp_bundle(tmp, 1, seed=0), os.path.join(repo, "mlp", "1"))
    s = start_server(repo, tmp, "--admin-token", TOKEN)
    s.tmp, s.repo = tmp, repo
    yield s
    stop_server(s)


def auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def status(server):
    return {v["version"]: v["state"] for v in
            requests.get(f"{server.url}/v1/models/mlp").json()["model_version_status"]}


def test_hot_swap_under_load_drops_no_request(live):
    v1 = expected(mlp_bundle(live.tmp, 1, seed=0))
    v2_dir = mlp_bundle(live.tmp, 2, seed=1)
    v2 = expected(v2_dir)
    assert not np.allclose(v1, v2)
    archive = pack(v2_dir, os.path.join(live.tmp, "mlp-2.tar.gz"))

    stop = threading.Event()
    results, failures = [], []

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{live.url}/v1/models/mlp:predict", json={"instances": ROW})
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    results.append((time.monotonic(), np.array(r.json()["predictions"])))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    r = requests.post(f"{live.url}/v1/models/mlp/versions", data=archive, headers=auth())
    uploaded_at = time.monotonic()
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "mlp" and body["version"] == 2 and body["digest"].startswith("sha256:")
    assert body["state"] == "AVAILABLE" and "note" not in body
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()

    assert failures == [], failures[:3]
    assert len(results) > 50
    outputs = [y for _, y in sorted(results, key=lambda r: r[0])]
    assert all(np.allclose(y, v1, atol=1e-5) or np.allclose(y, v2, atol=1e-5) for y in outputs)
    assert np.allclose(outputs[0], v1, atol=1e-5) and np.allclose(outputs[-1], v2, atol=1e-5)
    # A request that took v1's handle just before the publish may end shortly after the
    # 201 on a busy machine; whatever ends well after it must come from v2.
    after = [y for t, y in results if t > uploaded_at + 0.3]
    assert after and all(np.allclose(y, v2, atol=1e-5) for y in after), "v1 answered after the swap"
    deadline = time.time() + 10
    while status(live).get("1") != "END" and time.time() < deadline:
        time.sleep(0.05)
    assert status(live) == {"2": "AVAILABLE", "1": "END"}
    # The retired version's series are gone from /metrics but its END state; v2's stay.
    text = requests.get(f"{live.url}/metrics").text
    mlp = [l for l in text.splitlines() if 'model="mlp"' in l]
    assert [l for l in mlp if 'version="1"' in l] == ['nnserve_versions{model="mlp",version="1",state="END"} 1'], mlp
    assert any(l.startswith("nnserve_requests_total{") and 'version="2"' in l for l in mlp), mlp
    # Stored atomically, with its record beside the version directories.
    assert os.path.isfile(os.path.join(live.repo, "mlp", "2", "bundle.toml"))
    assert os.path.isfile(os.path.join(live.repo, "mlp", ".meta", "2.json"))
    assert not os.listdir(os.path.join(live.repo, ".tmp"))


def test_an_upload_the_version_policy_does_not_serve_says_so(live):
    """Under `latest = 1`, an upload older than the version serving is stored, not served,
    and the answer says it (it said "stored and serving")."""
    def bundle(version):
        # A model of its own, so that the other tests' mlp versions stay as they are.
        d = mlp_bundle(live.tmp, version, seed=version)
        toml = os.path.join(d, "bundle.toml")
        with open(toml) as f:
            text = f.read().replace('name = "mlp"', 'name = "older"')
        with open(toml, "w") as f:
            f.write(text)
        return pack(d, os.path.join(live.tmp, f"older-{version}.tar.gz"))

    r = requests.post(f"{live.url}/v1/models/older/versions", data=bundle(7), headers=auth())
    assert r.status_code == 201 and r.json()["state"] == "AVAILABLE", r.text
    r = requests.post(f"{live.url}/v1/models/older/versions", data=bundle(6), headers=auth())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["state"] == "END", body
    assert "not served" in body["note"] and "latest = 1" in body["note"] and "[7]" in body["note"], body
    assert os.path.isfile(os.path.join(live.repo, "older", "6", "bundle.toml"))
    r = requests.post(f"{live.url}/v1/models/older/versions/6:predict", json={"instances": ROW})
    assert r.status_code in (404, 503), r.text


def test_reupload_is_idempotent_and_other_content_conflicts(live):
    archive = pack(mlp_bundle(live.tmp, 2, seed=1), os.path.join(live.tmp, "again.tar.gz"))
    r = requests.post(f"{live.url}/v1/models/mlp/versions", data=archive, headers=auth())
    assert r.status_code == 200, r.text
    other = pack(mlp_bundle(live.tmp, 2, seed=5), os.path.join(live.tmp, "other.tar.gz"))
    r = requests.post(f"{live.url}/v1/models/mlp/versions", data=other, headers=auth())
    assert r.status_code == 409 and "upload it as a new version" in r.json()["error"]


def test_the_admin_token_guards_uploads_not_inference(live):
    archive = pack(mlp_bundle(live.tmp, 3, seed=3), os.path.join(live.tmp, "mlp-3.tar.gz"))
    r = requests.post(f"{live.url}/v1/models/mlp/versions", data=archive)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    r = requests.post(f"{live.url}/v1/models/mlp/versions", data=archive, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert not os.path.exists(os.path.join(live.repo, "mlp", "3"))
    assert requests.post(f"{live.url}/v1/models/mlp:predict", json={"instances": ROW}).status_code == 200


def evil_archive():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"[bundle]\nname = \"mlp\"\nversion = 9\n"
        info = tarfile.TarInfo("../escape.toml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("case,body,fragment", [
    ("not an archive", b"hello", "not a .tar.gz"),
    ("path traversal", None, "climbs out of the bundle"),
])
def test_invalid_uploads_are_refused_and_store_nothing(live, case, body, fragment):
    before = sorted(os.listdir(os.path.join(live.repo, "mlp")))
    r = requests.post(f"{live.url}/v1/models/mlp/versions", data=body or evil_archive(), headers=auth())
    assert r.status_code == 400 and fragment in r.json()["error"], r.text
    assert sorted(os.listdir(os.path.join(live.repo, "mlp"))) == before
    assert not os.path.exists(os.path.join(os.path.dirname(live.repo), "escape.toml"))
    assert requests.post(f"{live.url}/v1/models/mlp:predict", json={"instances": ROW}).status_code == 200


def test_a_model_that_does_not_load_is_refused_and_the_current_one_serves(live):
    broken = mlp_bundle(live.tmp, 4, seed=4)
    with open(os.path.join(broken, "model", "model.pt"), "wb") as f:
        f.write(b"not torchscript")
    archive = pack(broken, os.path.join(live.tmp, "broken.tar.gz"))
    r = requests.post(f"{live.url}/v1/models/mlp/versions", data=archive, headers=auth())
    assert r.status_code == 400 and "does not load" in r.json()["error"], r.text
    assert not os.path.exists(os.path.join(live.repo, "mlp", "4"))
    assert status(live)["2"] == "AVAILABLE"


def test_a_restart_serves_what_was_uploaded(live):
    v2 = expected(mlp_bundle(live.tmp, 2, seed=1))
    stop_server(live)
    again = start_server(live.repo, live.tmp, "--admin-token", TOKEN)
    try:
        r = requests.post(f"{again.url}/v1/models/mlp:predict", json={"instances": ROW})
        assert np.allclose(np.array(r.json()["predictions"]), v2, atol=1e-5)
        assert status(again) == {"2": "AVAILABLE"}
    finally:
        stop_server(again)
        live.proc = again.proc  # the fixture's stop finds it stopped


def test_an_upload_over_the_limit_is_413(tmp_path):
    repo = str(tmp_path / "repo")
    os.makedirs(repo)
    config = tmp_path / "nnserve.toml"
    config.write_text("max_upload_bytes = 1000\n")
    s = start_server(repo, str(tmp_path), "--config", str(config))
    try:
        r = requests.post(f"{s.url}/v1/models/mlp/versions", data=b"x" * 5000)
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]
    finally:
        stop_server(s)


def test_a_kill_during_an_upload_leaves_no_partial_version(tmp_path):
    repo = str(tmp_path / "repo")
    shutil.copytree(mlp_bundle(str(tmp_path), 1, seed=0), os.path.join(repo, "mlp", "1"))
    s = start_server(repo, str(tmp_path))
    archive = pack(mlp_bundle(str(tmp_path), 2, seed=1), str(tmp_path / "mlp-2.tar.gz"))

    def slow_body():
        yield archive[: len(archive) // 2]
        time.sleep(30)  # the server is killed meanwhile
        yield archive[len(archive) // 2:]

    t = threading.Thread(target=lambda: requests.post(f"{s.url}/v1/models/mlp/versions", data=slow_body()),
                         daemon=True)
    t.start()
    deadline = time.time() + 10
    scratch = os.path.join(repo, ".tmp")
    while not (os.path.isdir(scratch) and os.listdir(scratch)) and time.time() < deadline:
        time.sleep(0.02)
    assert os.listdir(scratch), "the upload never reached the scratch area"
    s.proc.kill()  # no chance to clean up
    s.proc.wait()
    again = start_server(repo, str(tmp_path))
    try:
        assert [d for d in sorted(os.listdir(os.path.join(repo, "mlp"))) if not d.startswith(".")] == ["1"]
        assert not os.path.exists(scratch) or not os.listdir(scratch)
        assert status(again) == {"1": "AVAILABLE"}
        assert requests.post(f"{again.url}/v1/models/mlp:predict", json={"instances": ROW}).status_code == 200
    finally:
        stop_server(again)


def test_bundle_push_uploads_with_the_cli(tmp_path):
    repo = str(tmp_path / "repo")
    shutil.copytree(mlp_bundle(str(tmp_path), 1, seed=0), os.path.join(repo, "mlp", "1"))
    s = start_server(repo, str(tmp_path), "--admin-token", TOKEN)
    try:
        v2 = mlp_bundle(str(tmp_path), 2, seed=1)
        archive = str(tmp_path / "mlp-2.tar.gz")
        pack(v2, archive)
        push = [NNSERVE, "bundle", "push", archive, "--server", s.url]
        r = subprocess.run(push, capture_output=True, text=True)
        assert r.returncode != 0 and "401" in r.stderr, r.stderr
        r = subprocess.run(push + ["--token", TOKEN], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert re.match(r"stored mlp@2 digest sha256:[0-9a-f]{64}, AVAILABLE", r.stdout), r.stdout
        r = subprocess.run(push + ["--token", TOKEN], capture_output=True, text=True)
        assert r.stdout.startswith("already stored mlp@2"), r.stdout
        y = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW}).json()["predictions"]
        assert np.allclose(y, expected(v2), atol=1e-5)
    finally:
        stop_server(s)


def test_a_version_whose_warmup_traps_is_refused_and_the_current_one_serves(tmp_path):
    from conftest import plugin_bundle
    repo = str(tmp_path / "repo")
    src = str(tmp_path / "src")
    good = plugin_bundle(src, "echoer", "misbehave.wasm", 'mode = "echo"')
    shutil.copytree(good, os.path.join(repo, "echoer", "1"))
    s = start_server(repo, str(tmp_path))
    try:
        bad = plugin_bundle(str(tmp_path / "src3"), "echoer", "misbehave.wasm", 'mode = "trap"',
                            warmup=[{"route": "/v1/models/echoer:infer", "body": "x"}])
        with open(os.path.join(bad, "bundle.toml")) as f:
            text = f.read().replace("version = 1", "version = 3")
        with open(os.path.join(bad, "bundle.toml"), "w") as f:
            f.write(text)
        archive = pack(bad, str(tmp_path / "bad.tar.gz"))
        r = requests.post(f"{s.url}/v1/models/echoer/versions", data=archive)
        assert r.status_code == 400 and "warm-up" in r.json()["error"], r.text
        states = {v["version"]: v for v in requests.get(f"{s.url}/v1/models/echoer").json()["model_version_status"]}
        assert states["1"]["state"] == "AVAILABLE"
        assert states["3"]["state"] == "END" and "trapped" in states["3"]["status"]["error_message"]
        assert not os.path.exists(os.path.join(repo, "echoer", "3"))
        assert requests.post(f"{s.url}/v1/models/echoer:infer", data=b"ok").content == b"ok"
    finally:
        stop_server(s)


def archive_of(files):
    """A .tar.gz of {path: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_each_bundle_rule_is_enforced_on_upload(tmp_path):
    """Unknown manifest field, a plugin of the wrong kind, a forbidden import, a symlink
    out: each refused with its reason, nothing stored, the server keeps serving."""
    from conftest import WASM
    repo = str(tmp_path / "repo")
    os.makedirs(repo)
    s = start_server(repo, str(tmp_path))
    src = mlp_bundle(str(tmp_path), 1, 0)
    manifest = open(os.path.join(src, "bundle.toml")).read()
    model = open(os.path.join(src, "model", "model.pt"), "rb").read()
    handler = '\n[handler]\npath = "plugins/handler.wasm"\n'
    cases = {
        "unknown field": ({"bundle.toml": (manifest + "\nflavour = 1\n").encode(), "model/model.pt": model},
                          "unknown field `flavour`"),
        "not a component": ({"bundle.toml": (manifest + handler).encode(), "model/model.pt": model,
                             "plugins/handler.wasm": b"\0asm\x01\0\0\0"}, "not a WebAssembly component"),
        "forbidden import": ({"bundle.toml": (manifest + handler).encode(), "model/model.pt": model,
                              "plugins/handler.wasm": open(os.path.join(WASM, "forbidden_import.wasm"), "rb").read()},
                             "wasi:sockets/tcp"),
    }
    try:
        for case, (files, fragment) in cases.items():
            r = requests.post(f"{s.url}/v1/models/mlp/versions", data=archive_of(files))
            assert r.status_code == 400, (case, r.text)
            assert fragment in r.json()["error"], (case, r.json()["error"])
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo("bundle.toml")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        r = requests.post(f"{s.url}/v1/models/mlp/versions", data=buf.getvalue())
        assert r.status_code == 400 and "absolute" in r.json()["error"]
        assert os.listdir(repo) in ([".tmp"], []) and not os.listdir(os.path.join(repo, ".tmp"))
        assert requests.get(f"{s.url}/v2/health/live").status_code == 200
    finally:
        stop_server(s)
