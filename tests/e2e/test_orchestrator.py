"""Running under an orchestrator (Kubernetes, KServe): probes, draining, what KServe's
storage initializer leaves in /mnt/models, JSON logs, x-request-id, process metrics.
The manifests themselves are checked in test_manifests.py."""
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
import requests

from conftest import EXAMPLES, MLP_MODEL, NNSERVE, start_server, stop_server, write_bundle
from test_connections import in_flight, mlp_repo, queue_depth, stopped_after

TF_SAVED = os.path.join(EXAMPLES, "tf-mlp", "1", "model", "saved_model")
X = [[0.5, -1.0, 2.0, 0.25], [1.0, 2.0, 3.0, 4.0]]


def gate(repo, name="gate", warm=0):
    """The gate model (tests/e2e/make_gate.py), one request per forward; with `warm`, a
    warm-up request asking for that many products (about a millisecond each), so that
    its load takes that long."""
    d = write_bundle(repo, name, '{ name = "x", dtype = "fp32", shape = [-1, 1] }',
                     '{ name = "y", dtype = "fp32", shape = [-1, 1] }',
                     handler="[batching]\nmax_batch_size = 1\nnum_batch_threads = 1\n")
    here = os.path.dirname(__file__)
    subprocess.run([os.sys.executable, os.path.join(here, "make_gate.py"), os.path.join(d, "model", "model.pt")],
                   check=True)
    if warm:
        os.makedirs(os.path.join(d, "warmup"))
        with open(os.path.join(d, "warmup", "00.json"), "w") as f:
            json.dump({"route": f"/v2/models/{name}/infer", "body": {"inputs": [
                {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [warm]}]}}, f)
    return repo


class Launched:
    """A server started without waiting for its load: its stdout lines are kept."""

    def __init__(self, repo, tmp, *args, env=None):
        self.log_path = os.path.join(str(tmp), "server.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([NNSERVE, "serve", "--repository", repo, "--listen", "127.0.0.1:0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=env)
        self.lines = []
        self.url = self.wait_for("nnserve live on ")

    def wait_for(self, text):
        """Reads stdout up to the line holding `text`; the URL that follows it."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"nnserve stopped; its log:\n{self.log()}")
            self.lines.append(line)
            if text in line:
                return line.split(text, 1)[1].split()[0].split('"')[0]

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.lines += self.proc.stdout.readlines()


def status(url, path):
    return requests.get(f"{url}{path}", timeout=10).status_code


# --- Probes ---------------------------------------------------------------------------

def grpc_probe(address, method):
    """KServe v2's ServerLive or ServerReady over gRPC: its bool (field 1)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                   request_serializer=lambda m: m, response_deserializer=lambda m: m)
        return call(b"", timeout=10) == b"\x08\x01"


def health_status(address):
    """grpc.health.v1 Check of the server (service ""): SERVING is 1, NOT_SERVING 2."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/grpc.health.v1.Health/Check",
                                   request_serializer=lambda m: m, response_deserializer=lambda m: m)
        answer = call(b"", timeout=10)
        return answer[1] if answer else 0


def test_live_while_a_slow_model_loads_and_ready_only_once_it_has(tmp_path):
    s = Launched(gate(mlp_repo(tmp_path), warm=3000), tmp_path, "--grpc-listen", "127.0.0.1:0")
    try:
        at = s.wait_for("nnserve gRPC live on grpc://")
        # The warm-up of gate takes about 3 s: the server is live, not ready, and the
        # model not yet ready either; over HTTP and gRPC alike.
        assert status(s.url, "/v2/health/live") == 200
        assert status(s.url, "/v2/health/ready") == 503
        assert status(s.url, "/v2/models/gate/ready") != 200
        ready = requests.get(f"{s.url}/v2/health/ready", timeout=10).json()
        assert ready["ready"] is False and "loading" in ready["reason"]
        assert grpc_probe(at, "ServerLive") and not grpc_probe(at, "ServerReady")
        assert health_status(at) == 2
        s.wait_for("nnserve listening on ")
        assert status(s.url, "/v2/health/ready") == 200
        assert status(s.url, "/v2/models/gate/ready") == 200
        assert grpc_probe(at, "ServerReady") and health_status(at) == 1
    finally:
        s.stop()


def test_readiness_any_is_ready_while_another_model_still_loads(tmp_path):
    # Models load in name order: mlp first, then zslow for about 3 s.
    s = Launched(gate(mlp_repo(tmp_path), "zslow", warm=3000), tmp_path, "--readiness", "any")
    try:
        deadline = time.time() + 60
        while status(s.url, "/v2/health/ready") != 200:
            assert time.time() < deadline, s.log()
            time.sleep(0.02)
        assert status(s.url, "/v2/models/mlp/ready") == 200
        assert status(s.url, "/v2/models/zslow/ready") != 200, "zslow was still loading"
    finally:
        s.stop()


def broken_repo(tmp):
    repo = mlp_repo(tmp)
    d = write_bundle(repo, "nogpu", '{ name = "input", dtype = "fp32", shape = [-1, 4] }',
                     '{ name = "output", dtype = "fp32", shape = [-1, 3] }')
    shutil.copy(MLP_MODEL, os.path.join(d, "model", "model.pt"))
    toml = os.path.join(d, "bundle.toml")
    with open(toml) as f:
        text = f.read().replace('device = "cpu"', 'device = "cuda:64"')
    with open(toml, "w") as f:
        f.write(text)
    return repo


def test_a_failed_start_up_version_keeps_the_server_unready_unless_any_is_asked(tmp_path):
    for readiness, expected in (("all", 503), ("any", 200)):
        s = start_server(broken_repo(tmp_path / readiness), str(tmp_path), "--readiness", readiness)
        try:
            assert status(s.url, "/v2/health/ready") == expected, readiness
            assert status(s.url, "/v2/models/mlp/ready") == 200
        finally:
            stop_server(s)
        if readiness == "all":
            assert "not ready: the versions of nogpu failed to load" in s.log()


# --- Draining -------------------------------------------------------------------------

def test_sigterm_drains_serving_new_requests_then_answers_all_in_flight_and_exits_0(tmp_path):
    s = start_server(gate(mlp_repo(tmp_path)), str(tmp_path), "--drain-seconds", "3", "--grace-seconds", "30")
    # 24 requests of about 150 ms each, one per forward: about 3.6 s of work in flight.
    threads, answers = in_flight(s.url, 24, 150)
    deadline = time.time() + 30
    while queue_depth(s.url, "gate") + sum(a is not None for a in answers) < 23:
        assert time.time() < deadline, answers
        time.sleep(0.01)
    signalled = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    while status(s.url, "/v2/health/ready") != 503:
        assert time.monotonic() - signalled < 5
    unready_after = time.monotonic() - signalled
    # New connections during the drain window are served.
    during = []
    while time.monotonic() - signalled < 2.5:
        r = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": X}, timeout=10)
        during.append(r.status_code)
        assert status(s.url, "/v2/health/live") == 200
    s.proc.wait(timeout=60)
    took = time.monotonic() - signalled
    for t in threads:
        t.join()
    print(f"drain: unready after {unready_after * 1000:.0f} ms, {len(during)} requests served during the "
          f"drain, exit after {took:.2f} s")
    assert unready_after < 0.1, unready_after
    assert during and set(during) == {200}, during
    assert answers == [200] * 24, answers
    assert s.proc.returncode == 0, s.log()
    assert took >= 3, "the drain lasted --drain-seconds"


def test_a_second_sigterm_during_the_drain_exits_at_once(tmp_path):
    s = start_server(mlp_repo(tmp_path), str(tmp_path), "--drain-seconds", "60")
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while status(s.url, "/v2/health/ready") != 503:
        assert time.time() < deadline
    took = stopped_after(s.proc, signal.SIGTERM)
    assert took < 3 and s.proc.returncode == 0, (took, s.log())


# --- What KServe's storage initializer leaves in /mnt/models --------------------------

def predict(url, model):
    r = requests.post(f"{url}/v1/models/{model}:predict", json={"instances": X}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def served(directory, tmp, *args, model, env=None):
    s = start_server(directory, str(tmp), *args, env=env)
    try:
        return predict(s.url, model)
    finally:
        stop_server(s)


def test_each_mnt_models_layout_is_served(tmp_path):
    # A repository: as ever. Its answers are the reference for the others.
    repo = mlp_repo(tmp_path)
    shutil.copytree(os.path.join(EXAMPLES, "tf-mlp"), os.path.join(repo, "tf-mlp"))
    s = start_server(repo, str(tmp_path), "--model-name", "isvc")  # KServe always passes it
    try:
        ref_mlp, ref_tf = predict(s.url, "mlp"), predict(s.url, "tf-mlp")
    finally:
        stop_server(s)
    # One bundle: under its own name, or the name KServe gives.
    bundle = tmp_path / "bundle"
    shutil.copytree(os.path.join(EXAMPLES, "mlp", "1"), bundle)
    assert served(str(bundle), tmp_path, model="mlp") == ref_mlp
    assert served(str(bundle), tmp_path, "--model-name", "iris", model="iris") == ref_mlp
    # A TF Serving model base path: <version>/saved_model.pb.
    base = tmp_path / "tfbase"
    for v in ("1", "2"):
        shutil.copytree(TF_SAVED, base / v)
    assert served(str(base), tmp_path, "--model-name", "tfm", model="tfm") == ref_tf
    # A bare TorchScript file, its inputs and outputs by flags or by environment.
    bare = tmp_path / "bare"
    os.makedirs(bare)
    shutil.copy(MLP_MODEL, bare / "model.pt")
    assert served(str(bare), tmp_path, "--model-name", "ts", "--input", "input:fp32:-1,4",
                  "--output", "output:fp32:-1,3", model="ts") == ref_mlp
    env = dict(os.environ, NNSERVE_MODEL_NAME="ts-env", NNSERVE_INPUTS="input:fp32:-1,4",
               NNSERVE_OUTPUTS="output:fp32:-1,3")
    assert served(str(bare), tmp_path, model="ts-env", env=env) == ref_mlp


def test_a_bare_model_without_what_it_needs_refuses_to_start_and_says_what_to_add(tmp_path):
    bare = tmp_path / "bare"
    os.makedirs(bare)
    shutil.copy(MLP_MODEL, bare / "model.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
    for args, needed in (([], "--model-name"), (["--model-name", "ts"], "--input"),
                         (["--model-name", "ts", "--input", "input:float:-1", "--output", "o:fp32:-1"], "NAME:DTYPE:DIMS")):
        out = subprocess.run([NNSERVE, "serve", "--repository", str(bare), "--listen", "127.0.0.1:0", *args],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode != 0 and needed in out.stderr, (args, out.stderr)
    out = subprocess.run([NNSERVE, "serve", "--repository", mlp_repo(tmp_path), "--listen", "127.0.0.1:0",
                          "--input", "x:fp32:-1"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0 and "holds a repository" in out.stderr, out.stderr


# --- Logs, request ids, metrics -------------------------------------------------------

def test_json_logs_every_line_parses_and_carries_the_request_id(tmp_path):
    repo = broken_repo(tmp_path)
    shutil.copytree(os.path.join(EXAMPLES, "tf-mlp"), os.path.join(repo, "tf-mlp"))
    # TensorFlow's own INFO lines on stderr (TF_CPP_MIN_LOG_LEVEL=0) must be wrapped too.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    s = Launched(repo, tmp_path, "--log-format", "json", "--readiness", "any", env=env)
    try:
        s.wait_for("nnserve listening on ")
        predict(s.url, "tf-mlp")
        r = requests.post(f"{s.url}/v1/models/nogpu:predict", json={"instances": X},
                          headers={"x-request-id": "trace-me-42"}, timeout=10)
        assert r.status_code == 503 and r.headers["x-request-id"] == "trace-me-42"
    finally:
        s.stop()
    stdout = [json.loads(line) for line in s.lines if line.strip()]
    assert any("nnserve listening on" in o["fields"]["message"] for o in stdout)
    log = [line for line in s.log().splitlines() if line.strip()]
    objects = []
    for line in log:
        try:
            objects.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not JSON: {line!r}")
    for o in objects + stdout:
        assert {"timestamp", "level", "target", "fields"} <= o.keys(), o
    assert any(o["target"] == "nnserve::native" for o in objects), "TensorFlow's stderr was captured"
    assert any(o.get("span", {}).get("request_id") == "trace-me-42" for o in objects), log[-5:]


def test_a_redirected_text_log_has_no_escape_codes(tmp_path):
    s = start_server(broken_repo(tmp_path), str(tmp_path))
    try:
        requests.post(f"{s.url}/v1/models/nogpu:predict", json={"instances": X}, timeout=10)
    finally:
        stop_server(s)
    assert "WARN" in s.log() and "\x1b[" not in s.log()


def test_x_request_id_is_kept_or_made_and_echoed_over_http_and_grpc(tmp_path):
    s = start_server(mlp_repo(tmp_path), str(tmp_path), "--grpc-listen", "127.0.0.1:0")
    try:
        given = requests.get(f"{s.url}/v2/health/live", headers={"x-request-id": "abc-123"}).headers
        assert given["x-request-id"] == "abc-123"
        made = {requests.get(f"{s.url}/v2/health/live").headers["x-request-id"] for _ in range(3)}
        assert len(made) == 3 and all(m for m in made)
        odd = requests.get(f"{s.url}/v2/health/live", headers={"x-request-id": "x\" y"}).headers["x-request-id"]
        assert odd != "x\" y" and '"' not in odd
        with grpc.insecure_channel(s.grpc) as channel:
            live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                       request_serializer=lambda m: m, response_deserializer=lambda m: m)
            _, call = live.with_call(b"", metadata=[("x-request-id", "grpc-7")], timeout=10)
            assert ("x-request-id", "grpc-7") in call.initial_metadata()
    finally:
        stop_server(s)


def test_metrics_have_process_figures_and_build_info(tmp_path):
    s = start_server(mlp_repo(tmp_path), str(tmp_path))
    try:
        text = requests.get(f"{s.url}/metrics").text
        rss_now = s.rss_mib()
    finally:
        stop_server(s)
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("process_")}
    assert 0.5 < values["process_resident_memory_bytes"] / 2**20 / rss_now < 2, (values, rss_now)
    assert values["process_cpu_seconds_total"] > 0
    assert 0 < time.time() - values["process_start_time_seconds"] < 600
    assert values["process_open_fds"] > 3 and values["process_threads"] > 1
    version = subprocess.run([NNSERVE, "--version"], capture_output=True, text=True).stdout.split()[-1]
    assert f'nnserve_build_info{{version="{version}",backends="torchscript,tensorflow"}} 1' in text
