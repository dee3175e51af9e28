#!/usr/bin/env python3
"""How much does loading a large model hurt another model's latency? And how soon does an
uploaded version serve? Prints figures; asserts nothing.

  .venv/bin/python bench/load_effect.py      (after `make setup` and
                                              `cargo build --release -p nnserve-bench`)

1. mlp's p99 on one keep-alive connection (nnserve-bench http), alone;
2. the same while a ~200 MB model is uploaded, unpacked, checked, loaded and warmed up;
3. the time from the upload's 201 to the first answer from the new version."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import requests
import torch
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NNSERVE = os.path.join(ROOT, "target", "release", "nnserve")
BENCH = os.path.join(ROOT, "target", "release", "nnserve-bench")


def big_bundle(d, width=4096, layers=3):
    os.makedirs(os.path.join(d, "model"))
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    torch.jit.script(nn.Sequential(nn.Linear(4, width), *mods, nn.Linear(width, 3)).eval()).save(
        os.path.join(d, "model", "model.pt"))
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write('[bundle]\nname = "big"\nversion = 1\n\n[model]\nbackend = "torchscript"\n'
                'path = "model/model.pt"\ndevice = "cpu"\n'
                'inputs = [{ name = "input", dtype = "fp32", shape = [-1, 4] }]\n'
                'outputs = [{ name = "output", dtype = "fp32", shape = [-1, 3] }]\n')


def loop(url, n, body):
    out = subprocess.run([BENCH, "http", url, "/v1/models/mlp:predict", body, str(n)],
                         capture_output=True, text=True, check=True).stdout
    return {k: float(v) for k, v in re.findall(r"(p50|p90|p99)\s+([\d.]+) us", out)}


def main():
    tmp = tempfile.mkdtemp()
    repo = os.path.join(tmp, "repo")
    shutil.copytree(os.path.join(ROOT, "examples", "repository", "mlp"), os.path.join(repo, "mlp"))
    big = os.path.join(tmp, "big")
    big_bundle(big)
    archive = os.path.join(tmp, "big.tar.gz")
    subprocess.run([NNSERVE, "bundle", "pack", big, "-o", archive], check=True, capture_output=True)
    size = os.path.getsize(archive)
    body = os.path.join(tmp, "mlp.json")
    with open(body, "w") as f:
        f.write('{"instances": [[1.0, 2.0, 3.0, 4.0]]}')
    server = subprocess.Popen([NNSERVE, "serve", "-r", repo, "-l", "127.0.0.1:0", "--log", "warn"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = next(re.search(r"listening on (http://\S+)", line).group(1)
                   for line in server.stdout if "listening on" in line)
        base = loop(url, 20000, body)
        result = {}

        def upload():
            t0 = time.monotonic()
            with open(archive, "rb") as f:
                r = requests.post(f"{url}/v1/models/big/versions", data=f)
            result["status"], result["upload_s"] = r.status_code, time.monotonic() - t0
            t1 = time.monotonic()
            r = requests.post(f"{url}/v1/models/big:predict", json={"instances": [[1, 2, 3, 4]]})
            result["first_answer_ms"], result["first_status"] = (time.monotonic() - t1) * 1e3, r.status_code

        t = threading.Thread(target=upload)
        t.start()
        during = loop(url, 20000, body)
        t.join()
        print(f"== {os.cpu_count()} cores; the large model: {size / 1e6:.0f} MB archive")
        print(f"mlp alone:                 p50 {base['p50']:.1f} us  p90 {base['p90']:.1f} us  p99 {base['p99']:.1f} us")
        print(f"mlp while 'big' uploads:   p50 {during['p50']:.1f} us  p90 {during['p90']:.1f} us  p99 {during['p99']:.1f} us")
        print(f"p99 ratio: {during['p99'] / base['p99']:.2f} (goal: at most 1.10)")
        print(f"upload: {result['status']} after {result['upload_s']:.2f} s (stream, unpack, check, load, warm up, rename)")
        print(f"first request to the new version after the 201: {result['first_status']} in {result['first_answer_ms']:.1f} ms")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
