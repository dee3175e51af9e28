"""Security hardening, part 1 (issue 14): nothing outside the repository, and a bound on
every input's memory. Each test is an attack that worked before: names from URLs that
reached the file system, archive headers read whole, answers amplified from small
requests, host memory a plugin made the server hold, plugins framing HTTP, internals in
public answers, unbounded versions, spooling before checking, huge Content-Lengths, and
log floods."""
import gzip
import http.client
import io
import json
import os
import socket
import tarfile
import threading
import time

import pytest
import requests

from conftest import MLP_IO, MLP_MODEL, start_server, stop_server, write_bundle

ROW = [[1.0, 2.0, 3.0, 4.0]]


def raw(server, method, path, body=None, headers=None):
    """One request with the path sent exactly as given (no client-side normalising)."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def still_serving(server):
    r = requests.post(f"{server.url}/v1/models/mlp:predict", json={"instances": ROW})
    assert r.status_code == 200, r.text


# --- 1. Names from URLs never reach the file system ------------------------------------

TRAVERSALS = [
    ("DELETE", "/v1/models/%2e%2e/versions/7", None),
    ("PUT", "/v1/models/%2e%2e/labels/x", json.dumps({"version": 7, "force": True})),
    ("PUT", "/v1/models/mlp/labels/%2e%2e", json.dumps({"version": 1, "force": True})),
    ("POST", "/v1/models/%2e%2e/versions", b"\x1f\x8b"),
    ("GET", "/v1/models/%2e%2e", None),
    ("GET", "/v1/models/%2e%2e/metadata", None),
    ("POST", "/v1/models/%2e%2e:predict", json.dumps({"instances": ROW})),
    ("POST", "/v1/models/%2e%2e:infer", b"x"),
    ("GET", "/v1/models/.meta", None),
    ("GET", "/v2/models/%2e%2e", None),
    ("GET", "/v2/models/%2e%2e/ready", None),
    ("POST", "/v2/models/%2e%2e/infer", b"{}"),
    ("POST", "/v2/models/..%2F..%2Fx/versions/1/infer", b"{}"),
    ("POST", "/v2/repository/models/%2e%2e/load", b"{}"),
    ("POST", "/v2/repository/models/%2e%2e/unload", b"{}"),
]


@pytest.mark.parametrize("method,path,body", TRAVERSALS, ids=[f"{m} {p}" for m, p, _ in TRAVERSALS])
def test_names_from_urls_are_checked_before_anything_else(server, method, path, body):
    beside = os.path.dirname(server.log_path)  # the repository's parent directory
    canary = os.path.join(beside, "7")
    os.makedirs(os.path.join(canary, "inside"), exist_ok=True)
    status, answer = raw(server, method, path, body, {"content-type": "application/json"})
    assert status == 400, (status, answer)
    assert "is not valid" in json.loads(answer)["error"]
    assert os.path.isdir(os.path.join(canary, "inside")), "the directory beside the repository was deleted"
    assert not os.path.exists(os.path.join(beside, ".meta")), "labels were written beside the repository"
    names = [m["name"] for m in requests.get(f"{server.url}/v1/models").json()["models"]]
    assert ".." not in names and ".meta" not in names
    still_serving(server)


def test_upper_case_names_are_valid_and_versions_are_int64(server):
    assert raw(server, "GET", "/v2/models/ResNet50")[0] == 404  # a valid name, not served
    assert raw(server, "GET", "/v2/models/Res%2FNet")[0] == 400
    top = 2**63 - 1
    assert raw(server, "GET", f"/v2/models/mlp/versions/{top}")[0] == 404
    for v in (2**63, 2**64 - 1, 10**30, 0):
        status, answer = raw(server, "GET", f"/v2/models/mlp/versions/{v}")
        assert status == 400 and b"9223372036854775807" in answer, (v, answer)
        status, _ = raw(server, "POST", f"/v1/models/mlp/versions/{v}:predict", json.dumps({"instances": ROW}))
        assert status == 400
    r = requests.put(f"{server.url}/v1/models/mlp/labels/big", json={"version": 2**63, "force": True})
    assert r.status_code == 400 and "out of range" in r.json()["error"], r.text


# --- 2. Archive headers are bounded before they are read --------------------------------

def tar_header(name, kind, size):
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def test_a_pax_bomb_is_refused_with_bounded_memory(server):
    # 1 MB of upload declaring a 1 GiB PAX extended header.
    body = gzip.compress(tar_header("././@PaxHeader", b"x", 1 << 30) + b"a" * (1 << 20), 9)
    before = server.rss_mib()
    r = requests.post(f"{server.url}/v1/models/bomb/versions", data=body)
    after = server.rss_mib()
    print(f"PAX bomb: RSS {before:.0f} -> {after:.0f} MiB, answer {len(r.content)} bytes")
    assert r.status_code == 400 and "PAX extended header of 1073741824 bytes" in r.json()["error"], r.text
    assert after - before < 64, f"RSS grew {after - before:.0f} MiB"
    still_serving(server)


def test_a_long_name_bomb_gets_a_small_answer(server):
    # 300 entries whose GNU long names are 60 KB each and climb out of the bundle.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for i in range(300):
            info = tarfile.TarInfo("../" + f"{i}-" + "n" * 60_000)
            tar.addfile(info, io.BytesIO(b""))
    before = server.rss_mib()
    r = requests.post(f"{server.url}/v1/models/bomb/versions", data=buf.getvalue())
    after = server.rss_mib()
    print(f"long-name bomb: {len(buf.getvalue())} bytes up, answer {len(r.content)} bytes, "
          f"RSS {before:.0f} -> {after:.0f} MiB")
    assert r.status_code == 400 and "climbs out" in r.text
    assert len(r.content) < 8192, len(r.content)
    assert "and 280 more problems" in r.json()["error"]
    still_serving(server)


# --- 3. Answers are bounded -------------------------------------------------------------

def test_an_output_named_many_times_is_answered_once(server):
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
            "outputs": [{"name": "output"}] * 10_000}
    r = requests.post(f"{server.url}/v2/models/mlp/infer", json=body)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["output"]
    assert len(r.content) < 1000
    body["outputs"] = [{"name": "nope"}]
    r = requests.post(f"{server.url}/v2/models/mlp/infer", json=body)
    assert r.status_code == 400 and "'nope'" not in r.text and '"nope"' in r.json()["error"]


def test_an_answer_over_max_response_bytes_fails_before_it_is_built(tmp_path):
    repo = str(tmp_path / "repo")
    d = write_bundle(repo, "mlp", *MLP_IO)
    with open(MLP_MODEL, "rb") as src, open(os.path.join(d, "model", "model.pt"), "wb") as dst:
        dst.write(src.read())
    config = tmp_path / "nnserve.toml"
    config.write_text("max_response_bytes = 2000\n")
    s = start_server(repo, str(tmp_path), "--config", str(config))
    try:
        small = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": ROW})
        assert small.status_code == 200
        rows = {"instances": ROW * 100}
        r = requests.post(f"{s.url}/v1/models/mlp:predict", json=rows)
        assert r.status_code == 500 and "max_response_bytes of 2000" in r.json()["error"], r.text
        r = requests.post(f"{s.url}/v2/models/mlp/infer", json={"inputs": [
            {"name": "input", "shape": [100, 4], "datatype": "FP32", "data": [1.0] * 400}]})
        assert r.status_code == 500 and "max_response_bytes" in r.json()["error"], r.text
    finally:
        stop_server(s)


# --- 4. Host memory a plugin makes the server hold counts against it --------------------

def test_host_tensors_past_the_plugin_budget_trap(server):
    before = server.rss_mib()
    r = requests.post(f"{server.url}/v1/models/tensors:infer", data=b"x")
    after = server.rss_mib()
    print(f"host tensors: RSS {before:.0f} -> {after:.0f} MiB")
    assert r.status_code == 500, r.text
    assert "host memory than its budget of 64 MiB" in r.json()["error"] and "tensors@1" in r.json()["error"]
    # Two at once: each stops at its budget (64 MiB of host tensors plus its linear memory).
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        requests.post(f"{server.url}/v1/models/tensors:infer", data=b"x").status_code)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = server.rss_mib()
    print(f"two at once: RSS {peak:.0f} MiB")
    assert results == [500, 500]
    assert peak - before < 600, f"RSS grew {peak - before:.0f} MiB"
    still_serving(server)


# --- 5. The host owns HTTP framing ------------------------------------------------------

def test_framing_headers_from_a_plugin_are_dropped_and_keep_alive_holds(server):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", "/v1/models/framing:infer", body=b"hi")
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and body == b"x" * 100
        assert r.getheader("x-kept") == "yes"
        for owned in ("transfer-encoding", "upgrade", "proxy-authenticate"):
            assert r.getheader(owned) is None, owned
        assert r.getheader("content-length") == "100"
        # The same connection serves the next request intact.
        conn.request("POST", "/v1/models/mlp:predict", body=json.dumps({"instances": ROW}))
        r = conn.getresponse()
        assert r.status == 200 and "predictions" in json.loads(r.read())
    finally:
        conn.close()


def test_a_plugin_status_outside_200_599_is_a_500_and_pipelining_holds(server):
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as s:
        one = b"POST /v1/models/status101:infer HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"
        two = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n"
        s.sendall(one + two)
        data = b""
        deadline = time.time() + 10
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            assert time.time() < deadline, data
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    first, second = data.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"500") and b"status 101" in first and b"status101@1" in first, first
    assert second.startswith(b"200") and b'"live":true' in second, second


# --- 6. Public answers carry no internals -----------------------------------------------

def test_the_public_status_of_a_failed_load_has_no_internals(server):
    r = requests.get(f"{server.url}/v1/models/badmodel")
    (status,) = r.json()["model_version_status"]
    message = status["status"]["error_message"]
    assert status["state"] == "END" and message, r.text
    repo = os.path.dirname(server.log_path)
    for internal in (repo, "frame #", "0x", "Exception raised from", ".so", "\n"):
        assert internal not in message, (internal, message)
    assert len(message) < 1100 and "server log" in message, message
    listing = requests.get(f"{server.url}/v1/models").json()["models"]
    (entry,) = [m for m in listing if m["name"] == "badmodel"]
    assert repo not in json.dumps(entry)
    r = requests.post(f"{server.url}/v1/models/badmodel:predict", json={"instances": ROW})
    assert r.status_code == 503 and repo not in r.text
    # The whole error is in the log.
    assert "badmodel" in server.log() and "PytorchStreamReader" in server.log()


def test_authenticated_management_sees_the_full_error(tmp_path):
    repo = str(tmp_path / "repo")
    d = write_bundle(repo, "badmodel", *MLP_IO)
    with open(os.path.join(d, "model", "model.pt"), "wb") as f:
        f.write(b"not a model")
    s = start_server(repo, str(tmp_path), "--admin-token", "t0ken")
    try:
        public = requests.get(f"{s.url}/v1/models/badmodel").json()
        full = requests.get(f"{s.url}/v1/models/badmodel", headers={"Authorization": "Bearer t0ken"}).json()
        p = public["model_version_status"][0]["status"]["error_message"]
        f = full["model_version_status"][0]["status"]["error_message"]
        assert repo not in p and repo in f, (p, f)
    finally:
        stop_server(s)


# --- Weak spots, bounded ----------------------------------------------------------------

def test_a_plugin_cpu_budget_above_the_server_maximum_is_refused(server):
    (status,) = requests.get(f"{server.url}/v1/models/greedy").json()["model_version_status"]
    assert status["state"] == "END"
    assert "cpu_ms = 600000 is above the server's maximum of 60000 ms (plugin_max_cpu_ms)" \
        in status["status"]["error_message"], status


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v1/models/mlp:predict", "/v1/models/mlp/versions"])
def test_a_huge_content_length_is_413_at_once(server, path):
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000000\r\n\r\n".encode())
        answer = s.recv(65536)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert took < 2, took


def read_answer(sock):
    """One whole HTTP/1.1 answer (headers and a Content-Length body) from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("start", [b"J", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"],
                         ids=["not gzip", "gzip of no tar"])
def test_an_upload_that_is_not_a_tar_gz_is_refused_before_it_is_spooled(server, start):
    repo = os.path.join(os.path.dirname(server.log_path), "repository")
    host, port = server.address
    if start == b"J":
        junk = b"J" * 70_000
    else:  # a real gzip stream whose content is not tar, longer than the 64 KiB looked at
        junk = gzip.compress(os.urandom(200_000), 0)[:70_000]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/models/junk/versions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        s.sendall(b"%x\r\n" % len(junk) + junk + b"\r\n")  # the rest never comes
        answer = read_answer(s)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"not a .tar.gz" in answer or b"does not hold a tar archive" in answer, answer
    scratch = os.path.join(repo, ".tmp")
    assert not os.path.exists(scratch) or not os.listdir(scratch)


def test_a_compression_bomb_stops_at_the_ratio_bound(server):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 256 << 20
        tar.addfile(info, _Zeros(256 << 20))
    body = buf.getvalue()
    started = time.monotonic()
    r = requests.post(f"{server.url}/v1/models/bomb/versions", data=body)
    print(f"256 MiB of zeros in {len(body)} bytes: refused in {time.monotonic() - started:.2f} s")
    assert r.status_code == 400 and "more than 100 times its compressed size" in r.text, r.text
    still_serving(server)


class _Zeros(io.RawIOBase):
    """n zero bytes, read without holding them."""

    def __init__(self, n):
        self.left = n

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self):
        return True


def test_plugin_logs_are_rate_limited_and_cannot_forge_lines(server):
    r = requests.post(f"{server.url}/v1/models/logflood:infer", data=b"x")
    assert r.status_code == 200
    deadline = time.time() + 5
    while "dropped 9936 log lines" not in server.log() and time.time() < deadline:
        time.sleep(0.05)
    log = server.log()
    assert "dropped 9936 log lines of one call (at most 64 per call)" in log
    lines = [line for line in log.splitlines() if "forged by the plugin" in line]
    assert len(lines) == 64, len(lines)
    assert not any(line.startswith("2026-01-01T00:00:00Z ERROR forged") for line in log.splitlines())
    assert "line 0\\n2026-01-01T00:00:00Z ERROR forged" in log


def test_all_plugins_together_are_bounded_by_plugin_memory_total(tmp_path):
    from conftest import plugin_bundle
    repo = str(tmp_path / "repo")
    plugin_bundle(repo, "tensors", "misbehave.wasm", 'mode = "tensors"', "memory_mib = 64, cpu_ms = 5000")
    plugin_bundle(repo, "echo", "misbehave.wasm", 'mode = "echo"')
    config = tmp_path / "nnserve.toml"
    config.write_text("plugin_memory_total_mib = 48\n")
    s = start_server(repo, str(tmp_path), "--config", str(config))
    try:
        # Its 32 MiB in linear memory and a first 32 MiB host tensor pass 48 MiB together.
        r = requests.post(f"{s.url}/v1/models/tensors:infer", data=b"x")
        assert r.status_code == 503 and "plugin_memory_total_mib" in r.json()["error"], r.text
        assert r.headers["retry-after"] == "1"
        # What it held is given back: a plugin within bounds serves.
        r = requests.post(f"{s.url}/v1/models/echo:infer", data=b"still here")
        assert r.status_code == 200 and r.content == b"still here"
    finally:
        stop_server(s)


def test_concurrent_uploads_wait_their_turn_and_a_same_version_race_is_never_429(tmp_path):
    from test_upload import mlp_bundle, pack
    repo = str(tmp_path / "repo")
    os.makedirs(repo)
    s = start_server(repo, str(tmp_path))
    try:
        archives = [pack(mlp_bundle(str(tmp_path), v, seed=v), str(tmp_path / f"mlp-{v}.tar.gz"))
                    for v in (1, 2, 3, 4)]
        same = [archives[3]] * 5
        results = {}

        def upload(i, body):
            results[i] = requests.post(f"{s.url}/v1/models/mlp/versions", data=body).status_code

        threads = [threading.Thread(target=upload, args=(i, b)) for i, b in enumerate(archives[:3] + same)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        different = [results[i] for i in range(3)]
        racing = sorted(results[i] for i in range(3, 8))
        print(f"concurrent uploads: {different}, same version x5: {racing}")
        assert different == [201, 201, 201], results
        assert racing.count(201) == 1 and set(racing) <= {200, 201, 409}, racing
        assert 429 not in results.values()
        stored = sorted(d for d in os.listdir(os.path.join(repo, "mlp")) if not d.startswith("."))
        assert stored == ["1", "2", "3", "4"]
    finally:
        stop_server(s)
