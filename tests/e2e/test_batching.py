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


def test_concurrent_v2_infer_with_mixed_row_counts_equals_unbatched(server):
    model = torch.jit.load(MLP).eval()
    rng = np.random.default_rng(8)
    inputs = [rng.normal(size=(1 + i % 7, 4)).astype(np.float32) for i in range(160)]
    rows0, _ = batch_sums(server, "mlp")

    def call(x):
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.flatten().tolist()}]}
        with requests.Session() as s:
            r = s.post(f"{server.url}/v2/models/mlp/infer", json=body)
            assert r.status_code == 200, r.text
            (out,) = r.json()["outputs"]
            return np.array(out["data"], dtype=np.float32).reshape(out["shape"])

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, inputs))
    for x, y in zip(inputs, got):
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    rows, _ = batch_sums(server, "mlp")
    assert rows - rows0 == sum(len(x) for x in inputs), "every row went through the batcher"


def test_concurrent_plugin_requests_equal_the_reference(server):
    labels = [str(d) for d in range(10)]
    ref = Reference(os.path.join(EXAMPLES, "digits", "1", "model", "model.pt"), labels)
    (_, _), (x, _) = digits_data.split()
    bodies = [encode(render(x[i], i), "PNG") for i in range(120)]

    def call(body):
        r = requests.post(f"{server.url}/v1/models/digits:infer", data=body)
        assert r.status_code == 200, r.text
        return [(p["label"], p["score"]) for p in r.json()["predictions"]]

    rows_before, _ = batch_sums(server, "digits")
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, bodies))
    rows_after, _ = batch_sums(server, "digits")
    assert rows_after - rows_before == 120, "every plugin compute went through the batcher"
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


def batch_histogram(server, model):
    """(rows, batches, batches of one row) of `model`'s nnserve_batch_size so far."""
    samples = [s for s in metric_families(server)["nnserve_batch_size"].samples
               if s.labels.get("model") == model and s.labels.get("version") == "1"]
    value = lambda name, **labels: next(
        (s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())), 0.0)
    return (value("nnserve_batch_size_sum"), value("nnserve_batch_size_count"),
            value("nnserve_batch_size_bucket", le="1.0"))


def batch_sums(server, model):
    rows, batches, _ = batch_histogram(server, model)
    return rows, batches


def test_metrics_parse_and_show_batches_larger_than_one(server):
    """heavy: a model of milliseconds, so 16 concurrent clients queue behind its forward."""
    rows0, count0, ones0 = batch_histogram(server, "heavy")
    body = {"instances": [np.zeros((1, 8, 8)).tolist()]}

    def call(_):
        r = requests.post(f"{server.url}/v1/models/heavy:predict", json=body)
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(160)))
    rows, count, ones = batch_histogram(server, "heavy")
    assert rows - rows0 == 160
    assert count - count0 < 160 and ones - ones0 < count - count0, \
        f"every batch had one row: {count - count0} batches, {ones - ones0} of one row"


def test_requests_whose_clients_leave_are_dropped_from_the_queue(server):
    """gate (tests/e2e/make_gate.py) runs one request per batch; a first request keeps it
    busy for about two seconds, 40 clients queue behind it and hang up: their requests
    leave the queue while the model is still busy, none of them runs, and the next client
    is served at once."""
    import socket
    import time
    rows0, _ = batch_sums(server, "gate")
    cancelled0 = gate_cancelled(server)
    host, port = server.url.removeprefix("http://").split(":")
    url = f"{server.url}/v1/models/gate:predict"
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(requests.post, url, json={"instances": [[4000.0]]})
        body = b'{"instances": [[1.0]]}'
        head = (f"POST /v1/models/gate:predict HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()

        def queued():
            return next(f.value for f in metric_families(server)["nnserve_queue_depth"].samples
                        if f.labels.get("model") == "gate")

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and batch_sums(server, "gate")[0] == rows0:
            time.sleep(0.01)  # the long forward has not started yet
        socks = []
        for _ in range(40):
            s = socket.create_connection((host, int(port)))
            s.sendall(head + body)
            socks.append(s)
        while queued() < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queued() == 40, "the 40 requests did not queue behind the long forward"
        assert not busy.done(), "the long forward ended before the test could look (a very fast CPU?)"
        for s in socks:
            s.close()
        # They leave the queue as their connections close, not when the model is free.
        while queued() > 0 and not busy.done():
            time.sleep(0.01)
        assert not busy.done(), "the abandoned requests stayed queued until the long forward ended"
        r = busy.result(timeout=60)
    assert r.status_code == 200 and r.json()["predictions"] == [[8000.0]], r.text
    r = requests.post(url, json={"instances": [[3.0]]})
    assert r.status_code == 200 and r.json()["predictions"] == [[6.0]], r.text
    rows, _ = batch_sums(server, "gate")
    ran = rows - rows0 - 2
    assert ran < 5, f"{ran:.0f} of the 40 abandoned requests ran"
    assert queued() == 0
    # Counted as such in the requests metric.
    cancelled = gate_cancelled(server) - cancelled0
    assert 40 - ran <= cancelled <= 40, f"{cancelled} of the 40 abandoned requests counted as cancelled"


def gate_cancelled(server):
    fam = metric_families(server)["nnserve_requests"]
    return sum(s.value for s in fam.samples if s.name == "nnserve_requests_total"
               and s.labels.get("model") == "gate" and s.labels.get("outcome") == "cancelled")


def test_padded_rows_are_counted_and_never_answered(server):
    """mlp allows batches of 1, 2, 4, ...: a request of 3 rows alone runs as a batch of 4,
    and the client gets its 3 rows."""
    def padding():
        fam = metric_families(server)["nnserve_batch_padding_rows"]
        return sum(s.value for s in fam.samples if s.name == "nnserve_batch_padding_rows_total"
                   and s.labels == {"model": "mlp", "version": "1"})

    model = torch.jit.load(MLP).eval()
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    before = padding()
    r = requests.post(f"{server.url}/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["predictions"], dtype=np.float32)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert padding() == before + 1


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
    overload_429s(lambda: requests.post(f"{server.url}/v1/models/tinyqueue:predict", json=body), 24, 48)


def overload_429s(post, threads, calls):
    """`calls` of `post` from `threads` threads: some served, some refused with 429,
    `Retry-After: 1` and the full queue named; then served again."""
    def call(_):
        r = post()
        return r.status_code, r.headers.get("retry-after"), r.json()

    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(call, range(calls)))
    codes = [c for c, _, _ in answers]
    assert set(codes) <= {200, 429}, codes
    assert 429 in codes and 200 in codes, codes
    for code, retry, j in answers:
        if code == 429:
            assert retry == "1" and "queue is full" in j["error"], j
    assert post().status_code == 200


def test_a_full_queue_reached_through_a_plugin_answers_429_too(server):
    """The plugin's compute is refused, the SDK answers `unavailable`, and the host, which
    saw the refusal, gives the client the 429 of a full queue (not a 503)."""
    (_, _), (x, _) = digits_data.split()
    png = encode(render(x[0], 0), "PNG")
    overload_429s(lambda: requests.post(f"{server.url}/v1/models/tinyqueue:infer", data=png), 32, 128)
