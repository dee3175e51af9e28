"""Bad input of every kind gets a clear error with the right status, and the server
keeps serving: each case is followed by a request that succeeds."""
import pytest

GOOD_PREDICT = {"instances": [[1.0, 2.0, 3.0, 4.0]]}


def still_serving(server, http):
    r = http.post(f"{server.url}/v1/models/mlp:predict", json=GOOD_PREDICT)
    assert r.status_code == 200, r.text
    r = http.post(f"{server.url}/v1/models/echo:infer", data=b"ping")
    assert r.status_code == 200 and r.content == b"ping"


def check(r, status, *fragments):
    assert r.status_code == status, (r.status_code, r.text)
    msg = r.json()["error"]
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def v2_body(name="input", shape=(1, 4), datatype="FP32", data=(1, 2, 3, 4)):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": list(data)}]}


def deep(n, depth):
    """Nested lists whose first elements claim n^depth values while the body holds few:
    a shape taken from first elements alone must not size anything."""
    v = 1.0
    for _ in range(depth):
        v = [v] + [[]] * (n - 1)
    return v


def png(width, height):
    """A solid grey PNG: a few KB, however many pixels."""
    import io
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(out, format="PNG")
    return out.getvalue()


HUGE = 1 << 62  # times 4 values per row, wraps to 0 in unchecked 64-bit arithmetic

CASES = {
    "unknown model (v1)": ("post", "/v1/models/nope:predict", GOOD_PREDICT, 404, ["model 'nope' is not found"]),
    "unknown model (v2)": ("post", "/v2/models/nope/infer", v2_body(), 404, ["model 'nope' is not found"]),
    "unknown model status": ("get", "/v1/models/nope", None, 404, ["'nope'"]),
    "unknown version (v1)": ("post", "/v1/models/mlp/versions/7:predict", GOOD_PREDICT, 404, ["version 7 of model 'mlp'"]),
    "unknown version (v2)": ("post", "/v2/models/mlp/versions/7/infer", v2_body(), 404, ["version 7"]),
    "malformed JSON (v1)": ("post", "/v1/models/mlp:predict", b"{not json", 400, ["malformed JSON"]),
    "malformed JSON (v2)": ("post", "/v2/models/mlp/infer", b"{not json", 400, ["malformed inference request"]),
    "neither instances nor inputs": ("post", "/v1/models/mlp:predict", {"rows": []}, 400, ["\"instances\"", "\"inputs\""]),
    "wrong input name (v1)": ("post", "/v1/models/mlp:predict", {"inputs": {"x": [[1, 2, 3, 4]]}}, 400, ["unknown input 'x'", "input"]),
    "wrong input name (v2)": ("post", "/v2/models/mlp/infer", v2_body(name="x"), 400, ["unknown input 'x'"]),
    "wrong shape (v1)": ("post", "/v1/models/mlp:predict", {"instances": [[1, 2, 3]]}, 400, ["input 'input' has shape [1, 3]", "[-1, 4]"]),
    "wrong shape (v2)": ("post", "/v2/models/mlp/infer", v2_body(shape=(2, 2)), 400, ["input 'input' has shape [2, 2]"]),
    "data does not fit shape (v2)": ("post", "/v2/models/mlp/infer", v2_body(shape=(2, 4)), 400, ["has 4 values but its shape [2, 4] needs 8"]),
    "shape whose size overflows (v2)": ("post", "/v2/models/mlp/infer", v2_body(shape=(HUGE, 4), data=()), 400, ["shape [4611686018427387904, 4]", "does not fit"]),
    "ragged nesting that claims 10^21 values (v1 columnar)": ("post", "/v1/models/mlp:predict", {"inputs": deep(1000, 7)}, 400, ["ragged"]),
    "ragged nesting that claims 10^21 values (v1 rows)": ("post", "/v1/models/mlp:predict", {"instances": deep(1000, 7)}, 400, ["ragged"]),
    "an input twice (v2)": ("post", "/v2/models/mlp/infer", {"inputs": v2_body()["inputs"] * 2}, 400, ['input "input" appears twice']),
    "ragged rows": ("post", "/v1/models/mlp:predict", {"instances": [[1, 2, 3, 4], [1, 2]]}, 400, ["ragged"]),
    "wrong dtype (v2)": ("post", "/v2/models/mlp/infer", v2_body(datatype="INT64"), 400, ["dtype int64", "expects fp32"]),
    "unsupported datatype (v2)": ("post", "/v2/models/mlp/infer", v2_body(datatype="BYTES"), 400, ["BYTES"]),
    "non-numbers": ("post", "/v1/models/mlp:predict", {"instances": [["a", 2, 3, 4]]}, 400, ["\"a\""]),
    "not an image": ("post", "/v1/models/digits:infer", b"this is text", 400, ["not a PNG or JPEG"]),
    "truncated image": ("post", "/v1/models/digits:infer", b"\x89PNG\r\n\x1a\n\x00\x00", 400, ["image"]),
    # 27 MB decoded: within the old 32 MiB cap, but the plugin's working copies then ran it
    # out of its 64 MiB (a 500 naming the memory cap).
    "image too large for the plugin": ("post", "/v1/models/digits:infer", png(3000, 3000), 400, ["too large for this model", "4096 pixels a side", "12 MiB decoded"]),
    "image wider than the plugin takes": ("post", "/v1/models/digits:infer", png(5000, 4), 400, ["too large for this model"]),
    "empty body to the plugin": ("post", "/v1/models/digits:infer", b"", 400, ["empty body"]),
    ":infer without a plugin": ("post", "/v1/models/mlp:infer", b"x", 400, ["no handler plugin"]),
    "unknown verb": ("post", "/v1/models/mlp:classify", GOOD_PREDICT, 404, [":classify"]),
    "unknown route": ("get", "/v3/whatever", None, 404, ["no route"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly_and_the_server_keeps_serving(server, http, case):
    method, path, body, status, fragments = CASES[case]
    kwargs = {}
    if isinstance(body, bytes):
        kwargs["data"] = body
    elif body is not None:
        kwargs["json"] = body
    r = getattr(http, method)(server.url + path, **kwargs)
    check(r, status, *fragments)
    still_serving(server, http)


def test_binary_tensor_framing_errors(server, http):
    r = http.post(f"{server.url}/v2/models/mlp/infer", data=b'{"inputs":[]}',
                  headers={"Inference-Header-Content-Length": "999"})
    check(r, 400, "Inference-Header-Content-Length is 999")
    head = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}'
    r = http.post(f"{server.url}/v2/models/mlp/infer", data=head + b"\0" * 8,
                  headers={"Inference-Header-Content-Length": str(len(head))})
    check(r, 400, "binary_data_size 16 but only 8 bytes")
    head = b'{"inputs":[{"name":"input","shape":[%d,4],"datatype":"FP32","parameters":{"binary_data_size":0}}]}' % HUGE
    r = http.post(f"{server.url}/v2/models/mlp/infer", data=head,
                  headers={"Inference-Header-Content-Length": str(len(head))})
    check(r, 400, "does not fit")
    head = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4],"parameters":{"binary_data_size":16}}]}'
    r = http.post(f"{server.url}/v2/models/mlp/infer", data=head + b"\0" * 16,
                  headers={"Inference-Header-Content-Length": str(len(head))})
    check(r, 400, "both \"data\" and a binary_data_size")
    head = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":-16}}]}'
    r = http.post(f"{server.url}/v2/models/mlp/infer", data=head,
                  headers={"Inference-Header-Content-Length": str(len(head))})
    check(r, 400, "binary_data_size must be a non-negative integer, not -16")
    still_serving(server, http)


def test_a_tf_serving_path_answers_a_method_it_does_not_take_with_its_own_allow(server, http):
    """One catch-all route serves /v1/models/...: a 405 lists the methods of that path,
    not every method of the catch-all, and never reads the body first."""
    base = f"{server.url}/v1/models/mlp"
    for method, path, allow in [("OPTIONS", "/metadata", "GET, HEAD"),
                                ("PUT", "/metadata", "GET, HEAD"),
                                ("GET", ":predict", "POST"),
                                ("DELETE", ":infer", "POST"),
                                ("PATCH", "", "GET, HEAD"),
                                ("GET", "/versions", "POST"),
                                # The session's server manages openly (loopback, no token).
                                ("POST", "/versions/1", "GET, HEAD, DELETE"),
                                ("DELETE", "/labels/stable", "GET, HEAD, PUT")]:
        r = http.request(method, base + path, data=b"{not json")
        check(r, 405, f"this resource takes {allow}")
        assert r.headers["allow"] == allow, (method, path, r.headers)
    # A path that is no resource stays a 404 (or a 400 for a bad name), whatever the method.
    check(http.request("OPTIONS", f"{server.url}/v1/models/mlp/nothing/here"), 404)
    check(http.request("PATCH", f"{server.url}/v1/models/..:predict"), 400, "not valid")
    still_serving(server, http)


def test_http_level_errors_are_json_and_say_what_to_do(server, http):
    import socket
    # A deadline header that is not a number is refused, not ignored.
    r = http.post(f"{server.url}/v1/models/mlp:predict", json=GOOD_PREDICT, headers={"x-nnserve-timeout-ms": "abc"})
    check(r, 400, "x-nnserve-timeout-ms must be a whole number of milliseconds")
    # Errors axum answers itself come as {"error": ...} too.
    r = http.put(f"{server.url}/v2/models/mlp/infer", data=b"{}")
    check(r, 405, "does not take this method")
    r = http.post(f"{server.url}/v2/models/mlp/infer", data=b"x" * (64 * 1024 * 1024 + 1))
    check(r, 413, "over 67108864 bytes (max_request_bytes)")
    # A declared length over the limit is refused before the body is sent.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/models/mlp:predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {70 * 1024 * 1024}\r\n\r\n".encode())
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head
    # A broken chunked body is the client's error (400), not "too large".
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/models/mlp:predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n".encode())
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 400"), head
    assert "could not be read" in head, head
    still_serving(server, http)


def test_a_plugin_that_traps_gives_500_naming_it(server, http):
    r = http.post(f"{server.url}/v1/models/trap:infer", data=b"x")
    check(r, 500, "plugin trap@1 (plugins/handler.wasm) trapped")
    still_serving(server, http)


def test_a_plugin_that_loops_runs_out_of_its_cpu_budget(server, http):
    r = http.post(f"{server.url}/v1/models/spin:infer", data=b"x")
    check(r, 504, "plugin spin@1", "CPU budget of 50 ms")
    still_serving(server, http)


def epoch_wakeups(server):
    """Voluntary context switches of the server's epoch ticker thread so far."""
    import glob
    for task in glob.glob(f"/proc/{server.proc.pid}/task/*"):
        if open(f"{task}/comm").read().strip() == "nnserve-epoch":
            for line in open(f"{task}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    return int(line.split()[1])
    raise AssertionError("no nnserve-epoch thread")


def test_the_epoch_ticker_sleeps_while_idle_and_budgets_still_hold_after(server, http):
    import time
    time.sleep(0.5)  # no plugin call: the ticker parks after 100 idle ticks
    before = epoch_wakeups(server)
    time.sleep(1.0)
    assert epoch_wakeups(server) - before < 20, "the ticker kept waking an idle server"
    started = time.monotonic()
    r = http.post(f"{server.url}/v1/models/spin:infer", data=b"x")
    check(r, 504, "plugin spin@1", "CPU budget of 50 ms")
    assert time.monotonic() - started < 2.0
    still_serving(server, http)


def test_the_request_deadline_gives_504_naming_the_budget(server, http):
    r = http.post(f"{server.url}/v1/models/slow:infer", data=b"x", headers={"x-nnserve-timeout-ms": "300"})
    check(r, 504, "request deadline of 300 ms", "plugin slow@1")
    still_serving(server, http)


def test_a_plugin_over_its_memory_cap_is_stopped(server, http):
    r = http.post(f"{server.url}/v1/models/hog:infer", data=b"x")
    check(r, 500, "plugin hog@1", "memory cap of 16 MiB")
    still_serving(server, http)


def test_a_plugin_importing_sockets_is_refused_at_load_naming_the_import(server, http):
    r = http.get(f"{server.url}/v1/models/forbidden")
    (status,) = r.json()["model_version_status"]
    assert status["state"] == "END"
    assert "wasi:sockets/" in status["status"]["error_message"], status
    assert "does not grant" in status["status"]["error_message"]
    r = http.post(f"{server.url}/v1/models/forbidden:infer", data=b"x")
    check(r, 503, "not available", "wasi:sockets/")
    assert "wasi:sockets" in server.log()
    still_serving(server, http)


def load_error(server, http, model):
    """The load error of a version that never became AVAILABLE."""
    r = http.get(f"{server.url}/v1/models/{model}")
    (status,) = r.json()["model_version_status"]
    assert status["state"] == "END", status
    return status["status"]["error_message"]


def test_a_version_on_a_gpu_the_machine_lacks_is_refused_with_the_reason(server, http):
    message = load_error(server, http, "nogpu")
    assert "asks for device cuda:64" in message, message
    assert "CUDA is not available" in message or "CUDA device(s)" in message, message
    check(http.post(f"{server.url}/v1/models/nogpu:predict", json={"instances": [[1, 2, 3, 4]]}),
          503, "not available")
    still_serving(server, http)


def test_a_plugin_starting_above_its_memory_cap_is_refused_at_load(server, http):
    message = load_error(server, http, "tinymem")
    assert "starts with 4096 KiB of linear memory" in message, message
    assert "handler.limits.memory_mib = 2" in message
    assert "set handler.limits.memory_mib to at least 4" in message
    check(http.post(f"{server.url}/v1/models/tinymem:infer", data=b"x"), 503, "not available")
    still_serving(server, http)


def test_an_invalid_bundle_is_reported_with_its_path_and_reason(server, http):
    r = http.get(f"{server.url}/v1/models/broken")
    (status,) = r.json()["model_version_status"]
    assert status["state"] == "END" and "flavour" in status["status"]["error_message"]
    assert "broken/1" in server.log()
    still_serving(server, http)


def test_warmup_requests_run_before_a_version_serves(server, http):
    r = http.get(f"{server.url}/v1/models/warm")
    assert r.json()["model_version_status"][0]["state"] == "AVAILABLE"
    r = http.get(f"{server.url}/v1/models/coldtrap")
    (status,) = r.json()["model_version_status"]
    assert status["state"] == "END"
    msg = status["status"]["error_message"]
    assert "warm-up warmup/00.json to /v1/models/coldtrap:infer failed" in msg and "trapped" in msg, msg
    still_serving(server, http)
