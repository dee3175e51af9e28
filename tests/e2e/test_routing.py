"""Endpoints: variants behind a router plugin. A user runs an A/B test (weighted, sticky
per user), a canary that is cut off while it fails, shadow traffic, and relies on the
endpoint to keep serving when its router misbehaves or is swapped under load."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from conftest import EXAMPLES, MLP_MODEL, NNSERVE, WASM, start_server, stop_server

HERE = os.path.dirname(os.path.abspath(__file__))
ROW = [[1.0, 2.0, 3.0, 4.0]]
BAD_ROW = [[1000.0, 2.0, 3.0, 4.0]]  # the flaky canary fails on it


def endpoint(repo, name, variants, router_wasm, config="", endpoint_extra="", version=1,
             limits="memory_mib = 16, cpu_ms = 5"):
    """Writes an endpoint bundle `repo/name/version/`; `variants` are TOML bodies."""
    d = os.path.join(repo, name, str(version))
    os.makedirs(os.path.join(d, "plugins"))
    shutil.copy(os.path.join(WASM, router_wasm), os.path.join(d, "plugins", "router.wasm"))
    text = f'[bundle]\nname = "{name}"\nversion = {version}\n\n[endpoint]\n{endpoint_extra}\n'
    for v in variants:
        text += f"\n[[variants]]\n{v}\n"
    text += f'\n[router]\npath = "plugins/router.wasm"\nconfig = {{ {config} }}\nlimits = {{ {limits} }}\n'
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(text)
    return d


def model_version(repo, name, version, model_file, batching=True):
    """A copy of the mlp bundle as `name`@`version` with the given model file."""
    d = os.path.join(repo, name, str(version))
    os.makedirs(os.path.join(d, "model"))
    with open(os.path.join(EXAMPLES, "mlp", "1", "bundle.toml")) as f:
        text = f.read().replace('name = "mlp"', f'name = "{name}"')
    text = text.replace("version = 1", f"version = {version}").replace('device = "auto"', 'device = "cpu"')
    if not batching:
        # A failing forward fails its whole batch; the flaky canary must fail alone.
        text = text[:text.index("[batching]")]
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(text)
    shutil.copy(model_file, os.path.join(d, "model", "model.pt"))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("routing"))
    repo = os.path.join(tmp, "repository")
    os.makedirs(repo)
    # The example A/B test, as `make run` serves it.
    for name in ("mlp-a", "mlp-b", "mlp-ab"):
        shutil.copytree(os.path.join(EXAMPLES, name), os.path.join(repo, name))
    endpoint(repo, "shadowed", ['model = "mlp-a"\nweight = 1', 'model = "mlp-b"\nweight = 0'],
             "weighted_router.wasm", config='shadow = "mlp-b"')
    # A canary: svc@1 is stable, svc@2 (flaky) is the canary.
    model_version(repo, "svc", 1, MLP_MODEL, batching=False)
    flaky = os.path.join(tmp, "flaky.pt")
    subprocess.run([sys.executable, os.path.join(HERE, "make_flaky.py"), flaky], check=True)
    model_version(repo, "svc", 2, flaky, batching=False)
    os.makedirs(os.path.join(repo, "svc", ".meta"))
    with open(os.path.join(repo, "svc", ".meta", "labels.json"), "w") as f:
        json.dump({"stable": 1, "canary": 2}, f)
    endpoint(repo, "svc-canary",
             ['name = "stable"\nmodel = "svc"\nlabel = "stable"',
              'name = "canary"\nmodel = "svc"\nlabel = "canary"'],
             "canary_router.wasm",
             # p99 is not what this test is about: on a busy 2-core machine it is noisy.
             config="percent = 50, min_requests = 10, max_error_rate_delta = 0.2, max_p99_ratio = 1000",
             endpoint_extra="stats_window_ms = 1500")
    # Routers that misbehave on request (header x-router-mode), one per failure policy.
    for name, policy in (("open", "fail-open"), ("closed", "fail-closed")):
        endpoint(repo, name, ['model = "mlp-a"', 'model = "mlp-b"'], "misbehave_router.wasm",
                 endpoint_extra=f'on_router_error = "{policy}"\ndefault_variant = "mlp-a"')
    # The bandit's variants differ for real: mlp-slow waits up to 3 ms to fill a batch, so
    # its p50 is milliseconds against mlp-a's tenth of one (two equal variants swap places
    # as their p50s move, and no preference could show).
    slow = os.path.join(repo, "mlp-slow", "1")
    shutil.copytree(os.path.join(EXAMPLES, "mlp-b", "1"), slow)
    with open(os.path.join(slow, "bundle.toml")) as f:
        text = f.read().replace('name = "mlp-b"', 'name = "mlp-slow"')
    with open(os.path.join(slow, "bundle.toml"), "w") as f:
        f.write(text + "batch_timeout_micros = 3000\n")
    endpoint(repo, "bandit", ['model = "mlp-a"', 'model = "mlp-slow"'], "bandit_router.wasm",
             config="epsilon = 0.1, min_requests = 5")
    # An endpoint whose only variant is another endpoint: never served, never followed.
    endpoint(repo, "nested", ['model = "mlp-ab"'], "weighted_router.wasm")
    s = start_server(repo, tmp)
    s.tmp, s.repo = tmp, repo
    yield s
    stop_server(s)
    assert s.proc.returncode == 0, s.log()


def reference(model_dir):
    m = torch.jit.load(os.path.join(model_dir, "model", "model.pt")).eval()
    return m(torch.tensor(ROW)).detach().numpy()


def predict(sess, url, name, row=ROW, headers=None):
    return sess.post(f"{url}/v1/models/{name}:predict", json={"instances": row}, headers=headers or {})


def variant(r):
    return r.headers.get("x-nnserve-variant")


def metric(url, prefix):
    """The sum of the samples whose line starts with `prefix` (name and labels)."""
    text = requests.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_an_endpoint_answers_like_a_model_and_names_the_variant(live):
    a, b = reference(os.path.join(EXAMPLES, "mlp-a", "1")), reference(os.path.join(EXAMPLES, "mlp-b", "1"))
    assert not np.allclose(a, b), "the two variants must answer differently"
    with requests.Session() as s:
        seen = {}
        for _ in range(60):
            r = predict(s, live.url, "mlp-ab")
            assert r.status_code == 200, r.text
            seen[variant(r)] = np.array(r.json()["predictions"])
        assert set(seen) == {"mlp-a@1", "mlp-b@1"}, seen.keys()
        assert np.allclose(seen["mlp-a@1"], a, atol=1e-5) and np.allclose(seen["mlp-b@1"], b, atol=1e-5)
        # KServe v2 goes through the router as well.
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        v2 = {variant(s.post(f"{live.url}/v2/models/mlp-ab/infer", json=body)) for _ in range(60)}
        assert v2 == {"mlp-a@1", "mlp-b@1"}
        # Metadata and readiness answer for the default variant (mlp-a).
        assert s.get(f"{live.url}/v2/models/mlp-ab").json()["name"] == "mlp-a"
        assert s.get(f"{live.url}/v2/models/mlp-ab/ready").status_code == 200
        # An explicit version bypasses the router: the default variant's model answers.
        for _ in range(20):
            r = s.post(f"{live.url}/v1/models/mlp-ab/versions/1:predict", json={"instances": ROW})
            assert r.status_code == 200 and variant(r) == "mlp-a@1"
        # A plain model names its version too.
        assert variant(predict(s, live.url, "mlp-b")) == "mlp-b@1"
    # The endpoint has no execution path of its own: no batch, queue or request-latency
    # series under its name (its traffic is counted per variant).
    text = requests.get(f"{live.url}/metrics").text
    for name in ("nnserve_batch_size", "nnserve_queue_duration_seconds", "nnserve_compute_duration_seconds",
                 "nnserve_queue_depth"):
        assert f'{name}_count{{model="mlp-a",version="1"}}' in text or f'{name}{{model="mlp-a",version="1"}}' in text, name
        assert 'model="mlp-ab"' not in "".join(l for l in text.splitlines(True) if l.startswith(name)), name


def test_keyless_requests_split_by_weight(live):
    n = 10_000

    def share_of_b(count):
        with requests.Session() as s:
            return sum(variant(predict(s, live.url, "mlp-ab")) == "mlp-b@1" for _ in range(count))

    with ThreadPoolExecutor(4) as pool:
        b = sum(pool.map(share_of_b, [n // 4] * 4))
    share = b / n
    assert abs(share - 0.10) <= 0.015, f"mlp-b got {share:.2%} of {n} requests, not 10% +- 1.5pp"
    assert metric(live.url, 'nnserve_endpoint_requests_total{endpoint="mlp-ab",variant="mlp-b",outcome="ok"}') >= b


def test_routing_keys_are_sticky(live):
    with requests.Session() as s:
        first = {f"user-{i}": variant(predict(s, live.url, "mlp-ab", headers={"x-user-id": f"user-{i}"}))
                 for i in range(200)}
        assert set(first.values()) == {"mlp-a@1", "mlp-b@1"}
        b_users = [u for u, v in first.items() if v == "mlp-b@1"]
        assert 0.03 <= len(b_users) / len(first) <= 0.2, len(b_users)
        for user in (b_users[0], next(u for u, v in first.items() if v == "mlp-a@1")):
            got = {variant(predict(s, live.url, "mlp-ab", headers={"x-user-id": user})) for _ in range(1000)}
            assert got == {first[user]}, f"{user} switched variants: {got}"


def test_shadow_variant_gets_a_copy_but_clients_see_the_primary(live):
    a = reference(os.path.join(EXAMPLES, "mlp-a", "1"))
    before = metric(live.url, 'nnserve_endpoint_shadow_requests_total{endpoint="shadowed",variant="mlp-b",outcome="ok"}')
    b_before = metric(live.url, 'nnserve_requests_total{model="mlp-b"')
    with requests.Session() as s:
        for _ in range(50):
            r = predict(s, live.url, "shadowed")
            assert r.status_code == 200 and variant(r) == "mlp-a@1"
            assert np.allclose(r.json()["predictions"], a, atol=1e-5)
    deadline = time.time() + 5
    while time.time() < deadline:
        shadowed = metric(live.url, 'nnserve_endpoint_shadow_requests_total{endpoint="shadowed",variant="mlp-b",outcome="ok"}')
        if shadowed - before >= 50:
            break
        time.sleep(0.05)
    assert shadowed - before == 50
    assert metric(live.url, 'nnserve_requests_total{model="mlp-b"') - b_before >= 50
    assert metric(live.url, 'nnserve_endpoint_requests_total{endpoint="shadowed",variant="mlp-b"') == 0


def canary_share(s, url, n, row=ROW):
    """Sends n requests to the canary endpoint; returns (canary share, statuses)."""
    got, statuses = [], []
    for _ in range(n):
        r = predict(s, url, "svc-canary", row=row)
        got.append(variant(r))
        statuses.append(r.status_code)
    return got.count("svc@2") / n, statuses


def test_canary_is_cut_off_while_it_fails_and_resumes_when_it_recovers(live):
    with requests.Session() as s:
        share, statuses = canary_share(s, live.url, 200)
        assert 0.35 <= share <= 0.65 and set(statuses) == {200}, (share, set(statuses))
        # The canary now fails every request it gets (stable serves the same rows well).
        time.sleep(1.6)  # a fresh window
        _, statuses = canary_share(s, live.url, 60, row=BAD_ROW)
        assert 500 in statuses
        # Cut off: past its min_requests failures, only stable answers.
        share, statuses = canary_share(s, live.url, 100, row=BAD_ROW)
        assert share == 0 and set(statuses) == {200}, (share, set(statuses))
        errors = metric(live.url, 'nnserve_endpoint_requests_total{endpoint="svc-canary",variant="canary",outcome="server_error"}')
        assert errors >= 10
        # Recovered (its inputs no longer fail it): once its failures leave the window,
        # it gets its share again and keeps it.
        time.sleep(1.6)
        share, statuses = canary_share(s, live.url, 200)
        assert 0.35 <= share <= 0.65 and set(statuses) == {200}, (share, set(statuses))


@pytest.mark.parametrize("mode,reason", [("trap", "trap"), ("loop", "cpu_budget"), ("unknown", "unknown_variant")])
def test_a_failing_router_fails_open_or_closed_and_the_server_keeps_serving(live, mode, reason):
    counter = f'nnserve_router_errors_total{{endpoint="%s",plugin="%s@1 (plugins/router.wasm)",reason="{reason}"}}'
    with requests.Session() as s:
        # It routes to the last variant (mlp-b) when it behaves.
        assert variant(predict(s, live.url, "open")) == "mlp-b@1"
        before = metric(live.url, counter % ("open", "open")), metric(live.url, counter % ("closed", "closed"))
        r = predict(s, live.url, "open", headers={"x-router-mode": mode})
        assert r.status_code == 200 and variant(r) == "mlp-a@1", r.text
        r = predict(s, live.url, "closed", headers={"x-router-mode": mode})
        assert r.status_code == 503, r.text
        assert "closed@1 (plugins/router.wasm)" in r.json()["error"] and "fail-closed" in r.json()["error"]
        after = metric(live.url, counter % ("open", "open")), metric(live.url, counter % ("closed", "closed"))
        assert after == (before[0] + 1, before[1] + 1)
        assert predict(s, live.url, "closed").status_code == 200
        assert predict(s, live.url, "mlp-a").status_code == 200
    assert "open@1 (plugins/router.wasm)" in live.log()


def test_an_endpoint_is_not_a_variant_of_another(live):
    with requests.Session() as s:
        r = predict(s, live.url, "nested")
        assert r.status_code == 503 and "a variant must be a model" in r.json()["error"], r.text
        r = s.post(f"{live.url}/v1/models/nested/versions/1:predict", json={"instances": ROW})
        assert r.status_code == 503 and "names the endpoint 'mlp-ab'" in r.json()["error"], r.text
        assert predict(s, live.url, "mlp-a").status_code == 200


def test_bundle_inspect_describes_an_endpoint():
    r = subprocess.run([NNSERVE, "bundle", "inspect", os.path.join(EXAMPLES, "mlp-ab", "1")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for line in ("endpoint routing key x-user-id, on router error fail-open, default variant mlp-a",
                 "variant mlp-b = model mlp-b, weight 10", "router   plugins/router.wasm", "exports route"):
        assert line in r.stdout, r.stdout


def test_a_router_may_not_import_wasi_nn_and_is_checked_at_upload(live):
    d = os.path.join(live.tmp, "bad-router")
    endpoint(d, "badroute", ['model = "mlp-a"'], "image_classifier.wasm")
    src = os.path.join(d, "badroute", "1")
    out = os.path.join(live.tmp, "badroute.tar.gz")
    subprocess.run(["tar", "-C", src, "-czf", out, "."], check=True)
    r = requests.post(f"{live.url}/v1/models/badroute/versions", data=open(out, "rb").read())
    assert r.status_code == 400, r.text
    assert "router plugins/router.wasm imports wasi:nn" in r.json()["error"]


def test_the_bandit_explores_then_prefers_a_variant(live):
    with requests.Session() as s:
        got = [variant(predict(s, live.url, "bandit")) for _ in range(300)]
    assert set(got[:20]) == {"mlp-a@1", "mlp-slow@1"}, "each variant is explored first"
    late = got[100:]
    # Exploitation sends about 1 - epsilon / 2 of the traffic to the faster variant.
    assert late.count("mlp-a@1") / len(late) >= 0.8, {v: late.count(v) for v in set(late)}


def test_swapping_the_router_under_load_drops_no_request(live):
    # v2 of mlp-ab sends everything to mlp-b.
    src = os.path.join(live.tmp, "swap")
    d = endpoint(src, "mlp-ab", ['model = "mlp-a"\nweight = 0', 'model = "mlp-b"\nweight = 100'],
                 "weighted_router.wasm", version=2)
    archive = os.path.join(live.tmp, "mlp-ab-2.tar.gz")
    r = subprocess.run([NNSERVE, "bundle", "pack", d, "-o", archive], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stop = threading.Event()
    results, failures = [], []

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                r = predict(s, live.url, "mlp-ab")
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    results.append((time.monotonic(), variant(r)))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    r = requests.post(f"{live.url}/v1/models/mlp-ab/versions", data=open(archive, "rb").read())
    swapped = time.monotonic()
    assert r.status_code == 201, r.text
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert failures == [], failures[:3]
    before = [v for t, v in results if t < swapped - 0.1]
    after = [v for t, v in results if t > swapped + 0.3]
    assert "mlp-a@1" in before and after and set(after) == {"mlp-b@1"}
    status = requests.get(f"{live.url}/v1/models/mlp-ab").json()["model_version_status"]
    assert {s["version"]: s["state"] for s in status}["2"] == "AVAILABLE"
