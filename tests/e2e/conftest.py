"""Fixtures for the end-to-end tests: a real nnserve (the release build that `make run`
uses) on an ephemeral loopback port, serving a temporary repository made of the example
bundles plus test bundles built from tests/plugins. Stopped by its own PID."""
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
NNSERVE = os.path.join(ROOT, "target", "release", "nnserve")
EXAMPLES = os.path.join(ROOT, "examples", "repository")
WASM = os.path.join(ROOT, "target", "wasm32-wasip2", "release")
sys.path.insert(0, os.path.join(ROOT, "examples"))

MLP_MODEL = os.path.join(EXAMPLES, "mlp", "1", "model", "model.pt")


def plugin_bundle(repo, name, wasm, config="", limits="memory_mib = 64, cpu_ms = 100"):
    """A bundle with the mlp model and a test plugin."""
    d = os.path.join(repo, name, "1")
    os.makedirs(os.path.join(d, "model"))
    os.makedirs(os.path.join(d, "plugins"))
    shutil.copy(MLP_MODEL, os.path.join(d, "model", "model.pt"))
    shutil.copy(os.path.join(WASM, wasm), os.path.join(d, "plugins", "handler.wasm"))
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(f"""
[bundle]
name = "{name}"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
device = "cpu"
inputs = [{{ name = "input", dtype = "fp32", shape = [-1, 4] }}]
outputs = [{{ name = "output", dtype = "fp32", shape = [-1, 3] }}]

[handler]
path = "plugins/handler.wasm"
config = {{ {config} }}
limits = {{ {limits} }}
""")


def multi_io_bundles(repo):
    """Two models with inputs `a` (fp32 [-1, 2]) and `b` (int64 [-1]): one returns a dict,
    one a tuple."""
    paths = []
    for name, outputs in (("dicty", ""), ("tuply", '{ name = "plus", dtype = "fp32", shape = [-1, 2] }, { name = "twice", dtype = "int64", shape = [-1] }')):
        d = os.path.join(repo, name, "1")
        os.makedirs(os.path.join(d, "model"))
        paths.append(os.path.join(d, "model", "model.pt"))
        with open(os.path.join(d, "bundle.toml"), "w") as f:
            f.write(f"""
[bundle]
name = "{name}"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
device = "cpu"
inputs = [{{ name = "a", dtype = "fp32", shape = [-1, 2] }}, {{ name = "b", dtype = "int64", shape = [-1] }}]
outputs = [{outputs}]
""")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_multi_io.py"), *paths], check=True)


class Server:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self):
        with open(self.log_path) as f:
            return f.read()


def start_server(repo, tmp, *args):
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [NNSERVE, "serve", "--repository", repo, "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 120
    url = None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        raise RuntimeError(f"nnserve did not start; its log:\n{open(log_path).read()}")
    return Server(proc, url, log_path)


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
    multi_io_bundles(repo)
    # A bundle whose manifest is wrong must not stop the others.
    os.makedirs(os.path.join(repo, "broken", "1"))
    with open(os.path.join(repo, "broken", "1", "bundle.toml"), "w") as f:
        f.write('[bundle]\nname = "broken"\nversion = 1\nflavour = "odd"\n')
    s = start_server(repo, tmp)
    yield s
    stop_server(s)
    assert s.proc.returncode == 0, f"nnserve exited with {s.proc.returncode}; log:\n{s.log()}"


@pytest.fixture(scope="session")
def http():
    with requests.Session() as sess:
        yield sess
