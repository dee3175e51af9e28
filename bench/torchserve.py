"""TorchServe 0.12 as the peer in bench/load.py: archives the same TorchScript files with
minimal handlers (bench/torchserve_handlers/), starts it on loopback ports with the given
workers, torch threads and batching, and stops it by its own process group.

All its state (model store, config, logs, pid file, temp files) stays under
bench/work/torchserve/, which is git-ignored. Needs Java 17 and bench/requirements.txt."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.dirname(sys.executable)
HANDLERS = os.path.join(ROOT, "bench", "torchserve_handlers")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def archive(work, name, model_pt, handler):
    """torch-model-archiver the TorchScript file with its handler into work/model-store."""
    store = os.path.join(work, "model-store")
    os.makedirs(store, exist_ok=True)
    subprocess.run([os.path.join(BIN, "torch-model-archiver"), "--model-name", name, "--version", "1.0",
                    "--serialized-file", model_pt, "--handler", os.path.join(HANDLERS, handler),
                    "--export-path", store, "--force"], check=True)
    return store


class TorchServe:
    """One TorchServe process serving `models`: {name: dict(workers, batch_size, max_batch_delay_ms)}."""

    def __init__(self, work, models, torch_threads=1, netty_threads=None):
        self.work = work
        self.models = models
        self.torch_threads = torch_threads
        self.netty_threads = netty_threads
        self.proc = None
        self.url = None

    def start(self, timeout=180):
        store = os.path.join(self.work, "model-store")
        logs = os.path.join(self.work, "logs")
        tmp = os.path.join(self.work, "tmp")
        for d in (logs, tmp):
            os.makedirs(d, exist_ok=True)
        ports = [free_port() for _ in range(3)]
        self.url = f"http://127.0.0.1:{ports[0]}"
        models = {name: {"1.0": {"defaultVersion": True, "marName": f"{name}.mar",
                                 "minWorkers": m["workers"], "maxWorkers": m["workers"],
                                 "batchSize": m["batch_size"], "maxBatchDelay": m["max_batch_delay_ms"],
                                 "responseTimeout": 120}}
                  for name, m in self.models.items()}
        lines = [f"inference_address=http://127.0.0.1:{ports[0]}",
                 f"management_address=http://127.0.0.1:{ports[1]}",
                 f"metrics_address=http://127.0.0.1:{ports[2]}",
                 f"model_store={store}",
                 "load_models=" + ",".join(f"{n}.mar" for n in self.models),
                 "models=" + json.dumps(models),
                 "disable_token_authorization=true",
                 "install_py_dep_per_model=false",
                 "enable_metrics_api=false",
                 "default_response_timeout=120"]
        if self.netty_threads:
            lines += [f"number_of_netty_threads={self.netty_threads}",
                      f"netty_client_threads={self.netty_threads}"]
        config = os.path.join(self.work, "config.properties")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        env = dict(os.environ, TS_BENCH_THREADS=str(self.torch_threads), TMPDIR=tmp, TEMP=tmp,
                   LOG_LOCATION=logs, METRICS_LOCATION=logs, PATH=BIN + os.pathsep + os.environ["PATH"])
        self.log = open(os.path.join(logs, "stdout.log"), "ab")
        # Its own session: the launcher, the Java frontend and the Python workers share one
        # process group, stopped together by that group's id (ours) in stop().
        self.proc = subprocess.Popen([os.path.join(BIN, "torchserve"), "--start", "--foreground", "--ncs",
                                      "--disable-token-auth", "--ts-config", config, "--model-store", store],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                     start_new_session=True)
        deadline = time.time() + timeout
        mgmt = f"http://127.0.0.1:{ports[1]}"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited; see {logs}")
            try:
                ready = all(
                    sum(w["status"] == "READY" for w in requests.get(f"{mgmt}/models/{n}", timeout=2).json()[0]["workers"])
                    >= m["workers"] for n, m in self.models.items())
                if ready:
                    return self.url
            except (requests.RequestException, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"TorchServe not ready in {timeout} s; see {logs}")

    def stop(self, timeout=30):
        """SIGTERM to the process group we started, then wait until every member (the Java
        frontend outlives the launcher for a moment) is gone; SIGKILL after `timeout`."""
        if self.proc:
            pgid = self.proc.pid
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.proc.wait()
            deadline = time.time() + timeout
            while True:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                if time.time() > deadline:
                    os.killpg(pgid, signal.SIGKILL)
                    deadline = time.time() + 5
                time.sleep(0.2)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None


def reset(work):
    """A clean state directory (the model store is rebuilt from the TorchScript files)."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
