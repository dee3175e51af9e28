#!/usr/bin/env python3
"""nnserve's protocols side by side under one load generator (bench/load, `nnserve-load`:
HTTP/1.1 and gRPC from the same one-thread loop), and with --peer pytriton Triton's own
gRPC (PyTriton from PyPI) on the same models in the same run; prints tables, asserts
nothing.

  .venv/bin/python bench/protocols.py [--seconds 5] [--peer pytriton]
      (needs `cargo build --release -p nnserve -p nnserve-load`; the peer makes its own
       venv under bench/work/pytriton-venv the first time: PyTriton pins numpy below 2)

mlp (one row of 4 floats):
  http-json    POST /v2/models/mlp/infer, JSON data
  http-binary  the same with Triton's binary tensor extension (tritonclient's default)
  grpc         ModelInfer with raw_input_contents (tritonclient[grpc]'s default)
  tfs-predict  TF Serving's Predict with tensor_content (tensorflow-serving-api's)
digits (one PNG through the image-classifier plugin):
  http-infer   POST /v1/models/digits:infer with the PNG as the body (the plugin route)
  http-binary  POST /v2/models/digits/infer, one BYTES input, binary
  grpc         ModelInfer, one BYTES input (raw)
at concurrency 1, 8 and 64; each HTTP worker on its own keep-alive connection, the gRPC
workers multiplexed on one channel as gRPC clients do (tritonclient, grpcio), and at c=64
also `grpc-64ch`, a channel per worker. Then the ratio gRPC / HTTP and, with the peer,
nnserve / Triton per row (the same one-channel client).

Every timed step first waits until no cargo, rustc or pytest process runs and the CPU is
mostly idle (bench/load.py's rule); a row measured while one ran is marked `*`."""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the shared helpers: quiet waits, bodies, servers)

ROOT = load.ROOT
LOADGEN = os.path.join(load.BIN, "nnserve-load")
PYTRITON_VENV = os.path.join(load.WORK, "pytriton-venv")


def messages(tmp, png):
    """The request bodies of every row, as files in `tmp`."""
    from tritonclient.grpc import service_pb2 as pb
    row = [1.0, 2.0, 3.0, 4.0]
    raw_row = b"".join(__import__("struct").pack("<f", v) for v in row)
    with open(png, "rb") as f:
        image = f.read()
    element = len(image).to_bytes(4, "little") + image
    files = {}

    def put(name, data):
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        files[name] = path
        return path
    put("mlp.json", json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                             "data": row}]}).encode())
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}],
                       "parameters": {"binary_data_output": True}}).encode()
    put("mlp.bin", head + raw_row)
    files["mlp.bin.header"] = len(head)
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(raw_row)
    put("mlp.grpc", req.SerializeToString())
    try:  # TF Serving's Predict (tensorflow-serving-api, installed by make setup)
        from tensorflow_serving.apis import predict_pb2
        from tensorflow.core.framework import tensor_pb2, types_pb2
        p = predict_pb2.PredictRequest()
        p.model_spec.name = "mlp"
        t = p.inputs["input"]
        t.dtype = types_pb2.DT_FLOAT
        t.tensor_shape.dim.add(size=1)
        t.tensor_shape.dim.add(size=4)
        t.tensor_content = raw_row
        put("mlp.tfs", p.SerializeToString())
    except ImportError:
        print("   (no tensorflow-serving-api: the tfs-predict row is left out)")
    put("digits.png", image)
    head = json.dumps({"inputs": [{"name": "request", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(element)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    put("digits.bin", head + element)
    files["digits.bin.header"] = len(head)
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="request", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(element)
    put("digits.grpc", req.SerializeToString())
    return files


def run_load(target, body, c, seconds, headers=(), channels=1):
    cmd = [LOADGEN, target, "--body", body, "--concurrency", str(c), "--seconds", str(seconds),
           "--channels", str(channels)]
    for h in headers:
        cmd += ["--header", h]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        sys.exit(f"nnserve-load failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


HEADER = f"{'server':<9}{'model':<8}{'protocol':<13}{'c':>4}{'req/s':>10}{'p50 us':>9}{'p99 us':>9}{'errors':>7}"


def row(server, model, proto, target, body, c, seconds, headers=(), channels=1):
    quiet = load.wait_quiet()
    r = run_load(target, body, c, seconds, headers, channels)
    mark = "" if quiet and not load.busy() else "*"
    print(f"{server + mark:<9}{model:<8}{proto:<13}{c:>4}{r['rps']:>10,.0f}{r['p50_us']:>9}{r['p99_us']:>9}"
          f"{r['errors']:>7}", flush=True)
    if r["errors"]:
        print(f"   first error: {r['first_error']}")
    return r


def cases(http, grpc, files):
    """(model, protocol, target, body, headers) of every nnserve row."""
    return [
        ("mlp", "http-json", f"{http}/v2/models/mlp/infer", files["mlp.json"],
         ["content-type: application/json"]),
        ("mlp", "http-binary", f"{http}/v2/models/mlp/infer", files["mlp.bin"],
         ["content-type: application/octet-stream",
          f"inference-header-content-length: {files['mlp.bin.header']}"]),
        ("mlp", "grpc", f"grpc://{grpc}/inference.GRPCInferenceService/ModelInfer", files["mlp.grpc"], []),
    ] + ([
        ("mlp", "tfs-predict", f"grpc://{grpc}/tensorflow.serving.PredictionService/Predict", files["mlp.tfs"], []),
    ] if "mlp.tfs" in files else []) + [
        ("digits", "http-infer", f"{http}/v1/models/digits:infer", files["digits.png"],
         ["content-type: image/png"]),
        ("digits", "http-binary", f"{http}/v2/models/digits/infer", files["digits.bin"],
         ["content-type: application/octet-stream",
          f"inference-header-content-length: {files['digits.bin.header']}"]),
        ("digits", "grpc", f"grpc://{grpc}/inference.GRPCInferenceService/ModelInfer", files["digits.grpc"], []),
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# PyTriton 0.7.0's Python-backend stub embeds a libpython whose C RLock predates
# `_recursion_count`, which Python 3.11.7's multiprocessing calls when the stub starts
# (every model failed to load with an AttributeError): the stub uses the pure-Python
# RLock there instead.
SITECUSTOMIZE = """\
try:
    import _thread
    if not hasattr(_thread.RLock(), "_recursion_count"):
        import threading
        import multiprocessing.resource_tracker as _rt
        _rt._resource_tracker._lock = threading._PyRLock()
except Exception:
    pass
"""


def pytriton_venv():
    """bench/work/pytriton-venv with PyTriton, seeing the main venv's torch and PIL after its
    own packages (a .pth line), since PyTriton pins numpy below 2."""
    py = os.path.join(PYTRITON_VENV, "bin", "python")
    if not os.path.exists(os.path.join(PYTRITON_VENV, ".ready")):
        print("== making bench/work/pytriton-venv (PyTriton 0.7.0; about 1 GB)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", PYTRITON_VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--progress-bar", "on", "nvidia-pytriton==0.7.0"],
                       check=True)
        main_site = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(site, "main-venv.pth"), "w") as f:
            f.write(main_site + "\n")
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        open(os.path.join(PYTRITON_VENV, ".ready"), "w").close()
    return py


def start_pytriton():
    py = pytriton_venv()
    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen([py, os.path.join(ROOT, "bench", "pytriton_server.py"), load.EXAMPLES,
                             str(grpc_port), str(http_port)], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            sys.exit("PyTriton did not start (its output is above)")
        if line.startswith("READY"):
            return proc, f"127.0.0.1:{grpc_port}"
    proc.kill()
    sys.exit("PyTriton did not start within 300 s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--peer", choices=["pytriton"], default=None)
    ap.add_argument("--concurrency", default="1,8,64")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = tempfile.mkdtemp(prefix="nnserve-grpc-bench-")
    try:
        _, png = load.request_bodies(tmp)
        files = messages(tmp, png)
        repo = os.path.join(tmp, "repo")
        for m in ("mlp", "digits"):
            shutil.copytree(os.path.join(load.EXAMPLES, m), os.path.join(repo, m))
        server = subprocess.Popen([load.NNSERVE, "serve", "-r", repo, "-l", "127.0.0.1:0", "--grpc-listen",
                                   "127.0.0.1:0", "--log", "warn", "--config", "/dev/null"],
                                  stdout=subprocess.PIPE, text=True)
        http = next(re.search(r"listening on (http://\S+)", line).group(1)
                    for line in server.stdout if "listening on" in line)
        grpc = re.search(r"grpc://(\S+)", server.stdout.readline()).group(1)
        print(f"== nnserve {http} and grpc://{grpc}; {args.seconds} s per row; one-thread nnserve-load", flush=True)
        print(HEADER)
        ours = {}
        try:
            for model, proto, target, body, headers in cases(http, grpc, files):
                for c in levels:
                    ours[(model, proto, c)] = row("nnserve", model, proto, target, body, c, args.seconds, headers)
                if proto == "grpc" and max(levels) > 1:
                    c = max(levels)
                    ours[(model, "grpc-64ch", c)] = row("nnserve", model, f"grpc-{c}ch", target, body, c,
                                                        args.seconds, headers, channels=c)
        finally:
            load.stop(server)
        print("== gRPC / HTTP, nnserve (req/s ratio; > 1: gRPC is faster)")
        for model, base in (("mlp", "http-json"), ("mlp", "http-binary"), ("digits", "http-infer"),
                            ("digits", "http-binary")):
            for c in levels:
                g, h = ours[(model, "grpc", c)], ours[(model, base, c)]
                print(f"   {model:<8} grpc / {base:<12} c={c:<3} {g['rps'] / h['rps']:.2f}")
        if args.peer == "pytriton":
            peer, at = start_pytriton()
            theirs = {}
            try:
                print(HEADER)
                for model in ("mlp", "digits"):
                    for c in levels:
                        theirs[(model, c)] = row("triton", model, "grpc",
                                                 f"grpc://{at}/inference.GRPCInferenceService/ModelInfer",
                                                 files[f"{model}.grpc"], c, args.seconds)
            finally:
                peer.terminate()
                peer.wait(timeout=60)
            print("== nnserve / Triton (PyTriton), gRPC (req/s ratio; p99 ratio < 1: nnserve's tail is shorter)")
            for (model, c), t in theirs.items():
                o = ours[(model, "grpc", c)]
                print(f"   {model:<8} c={c:<3} req/s {o['rps'] / t['rps']:.2f}   p99 {o['p99_us'] / max(1, t['p99_us']):.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
