"""Fixtures for the end-to-end tests: a real nnserve (the release build that `make run`
uses) on an ephemeral loopback port, serving a temporary repository made of the example
bundles plus test bundles built from tests/plugins. Stopped by its own PID."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# NNSERVE_BIN runs the suite against another build (e.g. one linked to a GPU machine's libtorch).
NNSERVE = os.environ.get("NNSERVE_BIN") or os.path.join(ROOT, "target", "release", "nnserve")
EXAMPLES = os.path.join(ROOT, "examples", "repository")
WASM = os.path.join(ROOT, "target", "wasm32-wasip2", "release")
sys.path.insert(0, os.path.join(ROOT, "examples"))

MLP_MODEL = os.path.join(EXAMPLES, "mlp", "1", "model", "model.pt")


MLP_IO = ('{ name = "input", dtype = "fp32", shape = [-1, 4] }',
          '{ name = "output", dtype = "fp32", shape = [-1, 3] }')


def write_bundle(repo, name, inputs, outputs, handler=""):
    """Creates `repo/name/1/` with a manifest for model/model.pt on CPU; returns the dir."""
    d = os.path.join(repo, name, "1")
    os.makedirs(os.path.join(d, "model"))
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(f"""
[bundle]
name = "{name}"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
device = "cpu"
inputs = [{inputs}]
outputs = [{outputs}]
{handler}""")
    return d


def plugin_bundle(repo, name, wasm, config="", limits="memory_mib = 64, cpu_ms = 100", warmup=None):
    """A bundle with the mlp model and a test plugin; `warmup` is a list of warm-up
    request dicts written to warmup/NN.json."""
    d = write_bundle(repo, name, *MLP_IO, handler=f"""
[handler]
path = "plugins/handler.wasm"
config = {{ {config} }}
limits = {{ {limits} }}
""")
    os.makedirs(os.path.join(d, "plugins"))
    shutil.copy(MLP_MODEL, os.path.join(d, "model", "model.pt"))
    shutil.copy(os.path.join(WASM, wasm), os.path.join(d, "plugins", "handler.wasm"))
    if warmup:
        os.makedirs(os.path.join(d, "warmup"))
        for i, req in enumerate(warmup):
            with open(os.path.join(d, "warmup", f"{i:02}.json"), "w") as f:
                json.dump(req, f)
    return d


def multi_io_bundles(repo):
    """Two models with inputs `a` (fp32 [-1, 2]) and `b` (int64 [-1]): one returns a dict,
    one a tuple."""
    inputs = '{ name = "a", dtype = "fp32", shape = [-1, 2] }, { name = "b", dtype = "int64", shape = [-1] }'
    tuple_outputs = '{ name = "plus", dtype = "fp32", shape = [-1, 2] }, { name = "twice", dtype = "int64", shape = [-1] }'
    paths = [os.path.join(write_bundle(repo, name, inputs, outputs), "model", "model.pt")
             for name, outputs in (("dicty", ""), ("tuply", tuple_outputs))]
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_multi_io.py"), *paths], check=True)


def heavy_bundle(repo, name="heavy", batching=""):
    """The image-classifier plugin over a model whose forward takes milliseconds."""
    d = os.path.join(repo, name, "1")
    shutil.copytree(os.path.join(EXAMPLES, "digits", "1"), d,
                    ignore=shutil.ignore_patterns("model.pt"))
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_heavy.py"),
                    os.path.join(d, "model", "model.pt")], check=True)
    toml = os.path.join(d, "bundle.toml")
    with open(toml) as f:
        text = f.read().replace('name = "digits"', f'name = "{name}"').replace('device = "auto"', 'device = "cpu"')
    if batching:
        text = text.replace("max_batch_size = 32\nallowed_batch_sizes = [1, 2, 4, 8, 16, 32]", batching)
    with open(toml, "w") as f:
        f.write(text)


class Server:
    def __init__(self, proc, url, log_path, grpc=None):
        self.proc, self.url, self.log_path = proc, url, log_path
        # host:port of the gRPC listener, when the server was started with --grpc-listen.
        self.grpc = grpc

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def rss_mib(self):
        """The server's resident memory now, MiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    @property
    def address(self):
        """(host, port) of the listener."""
        host, port = self.url.split("://", 1)[1].rsplit(":", 1)
        return host, int(port)


def self_signed_cert(tmp):
    """A certificate for 127.0.0.1 and its key, made by openssl in `tmp`: (cert, key)."""
    cert, key = os.path.join(str(tmp), "cert.pem"), os.path.join(str(tmp), "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def start_server(repo, tmp, *args, listen="127.0.0.1:0", env=None, preexec_fn=None):
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [NNSERVE, "serve", "--repository", repo, "--listen", listen, *args],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, preexec_fn=preexec_fn)
    deadline = time.time() + 120
    url = None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"listening on (https?://[^\s\"]+)", line)
        if m:
            url = m.group(1)
            break
    grpc = None
    if url is not None and "--grpc-listen" in args:
        # The gRPC line follows the HTTP one.
        m = re.search(r"gRPC listening on grpcs?://([^\s\"]+)", proc.stdout.readline())
        grpc = m and m.group(1)
        url = url if grpc else None
    if url is None:
        proc.kill()
        raise RuntimeError(f"nnserve did not start; its log:\n{open(log_path).read()}")
    return Server(proc, url, log_path, grpc)


def stop_server(server):
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not os.path.exists(NNSERVE):
        pytest.exit("target/release/nnserve is missing: run `make test`, which builds it")
    tmp = str(tmp_path_factory.mktemp("nnserve"))
    repo = os.path.join(tmp, "repository")
    os.makedirs(repo)
    for model in ("mlp", "digits"):
        shutil.copytree(os.path.join(EXAMPLES, model), os.path.join(repo, model))
    plugin_bundle(repo, "echo", "misbehave.wasm", 'mode = "echo"')
    plugin_bundle(repo, "trap", "misbehave.wasm", 'mode = "trap"')
    plugin_bundle(repo, "spin", "misbehave.wasm", 'mode = "loop"', "memory_mib = 64, cpu_ms = 50")
    plugin_bundle(repo, "slow", "misbehave.wasm", 'mode = "loop"', "memory_mib = 64, cpu_ms = 60000")
    plugin_bundle(repo, "hog", "misbehave.wasm", 'mode = "alloc"', "memory_mib = 16, cpu_ms = 5000")
    plugin_bundle(repo, "forbidden", "forbidden_import.wasm")
    # A model that stays busy for as long as a request asks (tests/e2e/make_gate.py), one
    # request per batch: requests queue behind it for as long as a test needs.
    d = write_bundle(repo, "gate", '{ name = "x", dtype = "fp32", shape = [-1, 1] }',
                     '{ name = "y", dtype = "fp32", shape = [-1, 1] }',
                     handler="[batching]\nmax_batch_size = 1\nnum_batch_threads = 1\n")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_gate.py"),
                    os.path.join(d, "model", "model.pt")], check=True)
    # A GPU no machine here has: refused at load with the reason, on CPU-only and GPU machines.
    d = write_bundle(repo, "nogpu", *MLP_IO)
    shutil.copy(MLP_MODEL, os.path.join(d, "model", "model.pt"))
    toml = os.path.join(d, "bundle.toml")
    with open(toml) as f:
        text = f.read().replace('device = "cpu"', 'device = "cuda:64"')
    with open(toml, "w") as f:
        f.write(text)
    # Starts with more linear memory (4 MiB, .cargo/config.toml) than its cap allows.
    plugin_bundle(repo, "tinymem", "misbehave.wasm", 'mode = "echo"', "memory_mib = 2, cpu_ms = 100")
    warm = [{"route": "/v1/models/warm:infer", "content_type": "text/plain", "body": "hello"},
            {"route": "/v1/models/warm:predict", "body": {"instances": [[1, 2, 3, 4]]}},
            {"route": "/v2/models/warm/infer", "body": {"inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}}]
    plugin_bundle(repo, "warm", "misbehave.wasm", 'mode = "echo"', warmup=warm)
    plugin_bundle(repo, "coldtrap", "misbehave.wasm", 'mode = "trap"',
                  warmup=[{"route": "/v1/models/coldtrap:infer", "body_base64": "aGk="}])
    # Plugins that break the rules of the sandbox (tests/e2e/test_hardening.py).
    plugin_bundle(repo, "tensors", "misbehave.wasm", 'mode = "tensors"', "memory_mib = 64, cpu_ms = 5000")
    plugin_bundle(repo, "framing", "misbehave.wasm", 'mode = "framing"')
    plugin_bundle(repo, "status101", "misbehave.wasm", 'mode = "status", status = "101"')
    plugin_bundle(repo, "logflood", "misbehave.wasm", 'mode = "logflood"', "memory_mib = 64, cpu_ms = 5000")
    plugin_bundle(repo, "greedy", "misbehave.wasm", 'mode = "echo"', "memory_mib = 64, cpu_ms = 600000")
    # A model file libtorch cannot read: its error carries stack frames and paths.
    d = write_bundle(repo, "badmodel", *MLP_IO)
    with open(os.path.join(d, "model", "model.pt"), "wb") as f:
        f.write(b"PK\x03\x04 not a torchscript archive" + bytes(2000))
    multi_io_bundles(repo)
    heavy_bundle(repo)
    heavy_bundle(repo, "tinyqueue", "max_batch_size = 1\nmax_enqueued_batches = 2")
    # A bundle whose manifest is wrong must not stop the others.
    os.makedirs(os.path.join(repo, "broken", "1"))
    with open(os.path.join(repo, "broken", "1", "bundle.toml"), "w") as f:
        f.write('[bundle]\nname = "broken"\nversion = 1\nflavour = "odd"\n')
    # Broken on purpose, the versions above keep `--readiness all` unready for good.
    s = start_server(repo, tmp, "--grpc-listen", "127.0.0.1:0", "--readiness", "any")
    yield s
    stop_server(s)
    assert s.proc.returncode == 0, f"nnserve exited with {s.proc.returncode}; log:\n{s.log()}"


@pytest.fixture(scope="session")
def http():
    with requests.Session() as sess:
        yield sess
