"""Under concurrency the example models batch (their bundles enable it), and every client
still gets exactly its own answer: batched results equal unbatched ones, through the
tensor APIs (mixed row counts, padding) and through the digits plugin."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import torch

import digits_data
from conftest import EXAMPLES
from reference import Reference
from test_digits import encode, render

MLP = os.path.join(EXAMPLES, "mlp", "1", "model", "model.pt")


def test_concurrent_predict_with_mixed_row_counts_equals_unbatched(server):
    model = torch.jit.load(MLP).eval()
    rng = np.random.default_rng(7)
    inputs = [rng.normal(size=(1 + i % 5, 4)).astype(np.float32) for i in range(200)]

    def call(x):
        with requests.Session() as s:
            r = s.post(f"{server.url}/v1/models/mlp:predict", json={"instances": x.tolist()})
            assert r.status_code == 200, r.text
            return np.array(r.json()["predictions"], dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, inputs))
    for x, y in zip(inputs, got):
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_concurrent_plugin_requests_equal_the_reference(server):
    labels = [str(d) for d in range(10)]
    ref = Reference(os.path.join(EXAMPLES, "digits", "1", "model", "model.pt"), labels)
    (_, _), (x, _) = digits_data.split()
    bodies = [encode(render(x[i], i), "PNG") for i in range(120)]

    def call(body):
        r = requests.post(f"{server.url}/v1/models/digits:infer", data=body)
        assert r.status_code == 200, r.text
        return [(p["label"], p["score"]) for p in r.json()["predictions"]]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, bodies))
    for body, answer in zip(bodies, got):
        want = ref.predict(body)
        assert [l for l, _ in answer] == [l for l, _ in want]
        np.testing.assert_allclose([s for _, s in answer], [s for _, s in want], rtol=1e-4, atol=1e-5)


def metric_families(server):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    r = requests.get(f"{server.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_metrics_parse_and_show_batches_larger_than_one(server):
    # Runs after the concurrent tests above (same server): mlp formed real batches.
    families = metric_families(server)
    samples = [s for s in families["nnserve_batch_size"].samples
               if s.labels.get("model") == "mlp" and s.labels.get("version") == "1"]
    count = next(s.value for s in samples if s.name == "nnserve_batch_size_count")
    ones = next(s.value for s in samples if s.name == "nnserve_batch_size_bucket" and s.labels["le"] == "1.0")
    assert count > 0 and ones < count, f"every batch had one row: {samples}"


def test_request_counters_move_with_traffic(server):
    def ok_count():
        fam = metric_families(server)["nnserve_requests"]
        return sum(s.value for s in fam.samples if s.name == "nnserve_requests_total"
                   and s.labels == {"model": "mlp", "version": "1", "outcome": "ok"})

    before = ok_count()
    for _ in range(3):
        assert requests.post(f"{server.url}/v1/models/mlp:predict",
                             json={"instances": [[1, 2, 3, 4]]}).status_code == 200
    assert ok_count() == before + 3
    fam = metric_families(server)["nnserve_versions"]
    assert any(s.labels == {"model": "mlp", "version": "1", "state": "AVAILABLE"} and s.value == 1
               for s in fam.samples)


def test_a_full_queue_answers_429_with_retry_after(server):
    """tinyqueue: a millisecond model, one row per batch, two batches of queue."""
    body = {"instances": [np.zeros((1, 8, 8)).tolist()]}

    def call(_):
        r = requests.post(f"{server.url}/v1/models/tinyqueue:predict", json=body)
        return r.status_code, r.headers.get("retry-after"), r.json()

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(call, range(48)))
    codes = [c for c, _, _ in answers]
    assert set(codes) <= {200, 429}, codes
    assert 429 in codes and 200 in codes, codes
    for code, retry, j in answers:
        if code == 429:
            assert retry == "1" and "queue is full" in j["error"]
    assert requests.post(f"{server.url}/v1/models/tinyqueue:predict", json=body).status_code == 200
