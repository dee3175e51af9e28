#!/usr/bin/env python3
"""A soak of one nnserve on loopback: every protocol's valid traffic, malformed and
oversized requests and hostile plugins at once, a hot swap every few seconds, label flips
and an upload race, then a calm phase and a SIGTERM with requests in flight. It prints
what was sent and answered, RSS over time, and the checks; it exits 1 if one fails.

  .venv/bin/python bench/soak.py [--seconds 180] [--storms 2] [--swap-every 10] [--clients 6]
                                 [--settle-max 300] [--hostile KIND,...]
  make soak [SOAK_SECONDS=180]
      (needs `make setup`: the release build, the plugins and the example models)

Phases: valid traffic and swaps throughout. Before the clock: a settle (valid traffic
until RSS moves less than 1 % in a minute, at most `--settle-max`: the allocator's thread
heaps take a minute or two to fill), a warm-up storm as long as the others, and a second
settle (what is sized once for a storm's concurrency: plugin slots kept warm, allocator
pages; RSS before any storm is printed beside). Then storms (all of the above;
two by default, `--storms`; `--hostile` picks kinds) spread from 10 % of the time on,
each followed by a calm as long, so that memory settles; then SIGTERM while the clients
keep sending. Checks:
- no request lost: every request sent before the SIGTERM was answered (a refused
  connection after it is not a loss; a connection dropped mid-request is);
- every request in flight at the SIGTERM was answered (the server drains);
- 0 5xx outside the hostile plugins' own answers, and none for a valid request during
  a hot swap or a label flip;
- RSS after the last storm's calm is within 10 % of RSS before the first storm on the clock
  (after the warm-up storm and its settle) and of RSS after the first storm's calm:
  hostility leaves nothing behind. The warm-up sends every kind from the storms' threads,
  so that the Wasm pool slots they use (each keeps its low 4 MiB resident once used, by
  design: docs/design.md) are in the baseline.

Loopback only, ephemeral ports, the server stopped by its own PID, every loop bounded by
the clock."""
import argparse
import collections
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np
import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NNSERVE = os.path.join(ROOT, "target", "release", "nnserve")
EXAMPLES = os.path.join(ROOT, "examples", "repository")
WASM = os.path.join(ROOT, "target", "wasm32-wasip2", "release")
TOKEN = "soak-token"
DRAIN_SECONDS = 2
MAX_REQUEST = 4 << 20
MAX_RESPONSE = 8 << 20
# The settle ends when RSS moved less than this factor (up or down) over this many seconds.
SETTLE_GROWTH = 1.01
SETTLE_WINDOW = 60
# Threads sending the hostile kinds during a storm.
HOSTILE_THREADS = 2
ROW = [[1.0, 2.0, 3.0, 4.0]]
# Hostile plugins: (model, misbehave mode, limits). Their own 5xx answers are expected.
HOSTILE = [
    ("h-loop", "loop", "memory_mib = 64, cpu_ms = 50"),
    ("h-alloc", "alloc", "memory_mib = 32, cpu_ms = 5000"),
    ("h-panic", "panic", "memory_mib = 64, cpu_ms = 100"),
    ("h-trap", "trap", "memory_mib = 64, cpu_ms = 100"),
    ("h-tensors", "tensors", "memory_mib = 64, cpu_ms = 5000"),
    ("h-logflood", "logflood", "memory_mib = 64, cpu_ms = 5000"),
    # 16 MiB answered, over the server's max_response_bytes here (MAX_RESPONSE).
    ("h-huge", "huge", "memory_mib = 64, cpu_ms = 5000"),
]


# What a storm sends, by kind (`--hostile` picks some).
STORM_KINDS = [name for name, _, _ in HOSTILE] + ["huge-echo", "malformed", "wrong-shape", "unknown", "oversized"]


class Tally:
    """Thread-safe counts: answers by (kind, status), failures by (kind, error)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answered = collections.Counter()
        self.failed = collections.Counter()
        self.unexpected = []  # (kind, status, text)
        self.lost = []  # (kind, error, detail) of requests lost
        self.sent = 0

    def answer(self, kind, status, text="", expected=True):
        with self.lock:
            self.answered[(kind, status)] += 1
            if not expected and len(self.unexpected) < 20:
                self.unexpected.append((kind, status, text[:200]))
            elif not expected:
                self.unexpected.append((kind, status, ""))

    def fail(self, kind, error, lost, detail=""):
        with self.lock:
            self.failed[(kind, error)] += 1
            if lost:
                self.lost.append((kind, error, detail[:300]))


def write_bundle(repo, name, mode, limits):
    d = os.path.join(repo, name, "1")
    os.makedirs(os.path.join(d, "plugins"))
    shutil.copy(os.path.join(WASM, "misbehave.wasm"), os.path.join(d, "plugins", "handler.wasm"))
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(f'[bundle]\nname = "{name}"\nversion = 1\n\n[handler]\npath = "plugins/handler.wasm"\n'
                f'config = {{ mode = "{mode}" }}\nlimits = {{ {limits} }}\n')


def mlp_archive(version, note=""):
    """The example mlp as version `version`, packed in memory (its weights unchanged);
    `note`, a comment in its manifest, makes content of its own."""
    src = os.path.join(EXAMPLES, "mlp", "1")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for root, _, files in os.walk(src):
            for f in files:
                path = os.path.join(root, f)
                rel = os.path.relpath(path, src)
                if rel == "bundle.toml":
                    text = open(path).read().replace("version = 1", f"version = {version}")
                    text = (text + (f"# {note}\n" if note else "")).encode()
                    info = tarfile.TarInfo(rel)
                    info.size = len(text)
                    tar.addfile(info, io.BytesIO(text))
                else:
                    tar.add(path, arcname=rel)
    return buf.getvalue()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return None


def start(repo, tmp):
    config = os.path.join(tmp, "nnserve.toml")
    with open(config, "w") as f:
        f.write(f"max_request_bytes = {MAX_REQUEST}\nmax_response_bytes = {MAX_RESPONSE}\n")
    log = open(os.path.join(tmp, "server.log"), "w")
    proc = subprocess.Popen([NNSERVE, "serve", "-r", repo, "-l", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
                             "--admin-token", TOKEN, "--drain-seconds", str(DRAIN_SECONDS), "--readiness", "any",
                             "--config", config, "--log", "warn"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    url = grpc = None
    for line in proc.stdout:
        m = re.search(r"gRPC live on grpc://(\S+)", line)
        grpc = m.group(1) if m else grpc
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if not url or not grpc:
        sys.exit(f"nnserve did not start; see {log.name}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, url, grpc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--swap-every", type=float, default=10)
    ap.add_argument("--clients", type=int, default=6, help="valid-traffic threads")
    ap.add_argument("--storms", type=int, default=2,
                    help="storms, each followed by as long a calm (more show whether memory keeps growing)")
    ap.add_argument("--settle-max", type=float, default=300,
                    help="longest settle before the clock starts, s (RSS under steady traffic grows for a "
                         "minute or two first; see the phases above)")
    ap.add_argument("--hostile", default="all",
                    help="comma-separated kinds the storms send (default all): " + ", ".join(STORM_KINDS))
    args = ap.parse_args()
    kinds = STORM_KINDS if args.hostile == "all" else args.hostile.split(",")
    if unknown := set(kinds) - set(STORM_KINDS):
        ap.error(f"--hostile: no kind {', '.join(sorted(unknown))}; the kinds are {', '.join(STORM_KINDS)}")
    # Storms, each followed by calm: the first one's one-time growth (plugin instance
    # slots first used keep 4 MiB resident each, by design: docs/design.md) is the
    # baseline; the later ones must not add to it.
    period = args.seconds * 0.9 / args.storms
    storms = [(args.seconds * 0.10 + i * period, args.seconds * 0.10 + (i + 0.5) * period)
              for i in range(args.storms)]
    # RSS is read at the end of each storm's calm (the last one's at the end).
    calm_ends = [b + period / 2 - 1 for _, b in storms]
    baseline_at = calm_ends[0]

    def storming():
        return warm_storm.is_set() or (settled.is_set() and any(a <= elapsed() < b for a, b in storms))
    tmp = tempfile.mkdtemp(prefix="nnserve-soak-")
    repo = os.path.join(tmp, "repo")
    for m in ("mlp", "digits"):
        shutil.copytree(os.path.join(EXAMPLES, m), os.path.join(repo, m))
    write_bundle(repo, "echo", "echo", "memory_mib = 64, cpu_ms = 100")
    for name, mode, limits in HOSTILE:
        write_bundle(repo, name, mode, limits)
    png = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "draw_digit.py"), "7",
                          os.path.join(tmp, "seven.png")], capture_output=True)
    png = open(os.path.join(tmp, "seven.png"), "rb").read() if png.returncode == 0 else None

    proc, url, grpc = start(repo, tmp)
    tally = Tally()
    t0 = [time.monotonic()]  # reset when RSS has settled: the clock of the phases
    settled = threading.Event()
    warm_storm = threading.Event()
    stop = threading.Event()
    sigterm_at = [None]
    rss = []

    def elapsed():
        return time.monotonic() - t0[0]

    def call(kind, fn, expect_5xx=False):
        """One request: its answer counted, or its failure classified."""
        with tally.lock:
            tally.sent += 1
        try:
            r = fn()
        except requests.exceptions.ConnectionError as e:
            text = str(e)
            refused = "Connection refused" in text or "Errno 111" in text
            # After the drain the listener is closed (refused) and idle keep-alive
            # connections are closed: a request racing that close was never accepted.
            after_drain = sigterm_at[0] is not None and elapsed() >= sigterm_at[0] + DRAIN_SECONDS
            tally.fail(kind, "refused" if refused else "dropped", lost=not (refused or after_drain), detail=text)
            return None
        except requests.exceptions.Timeout as e:
            tally.fail(kind, "timeout", lost=True, detail=str(e))
            return None
        except Exception as e:  # gRPC errors carry their status
            # tritonclient's errors have status(), grpc's own code().
            code = getattr(e, "status", None) or getattr(e, "code", None)
            code = code() if callable(code) else None
            name = str(code) if code else type(e).__name__
            unavailable = "UNAVAILABLE" in name
            after_drain = sigterm_at[0] is not None and elapsed() >= sigterm_at[0] + DRAIN_SECONDS
            tally.fail(kind, name, lost=not (unavailable and after_drain), detail=str(e))
            return None
        bad = r.status_code >= 500 and not expect_5xx
        tally.answer(kind, r.status_code, r.text if bad else "", expected=not bad)
        return r

    def valid_http():
        with requests.Session() as s:
            i = 0
            while not stop.is_set():
                i += 1
                call("tfs-predict", lambda: s.post(f"{url}/v1/models/mlp:predict", json={"instances": ROW}, timeout=30))
                call("v2-infer", lambda: s.post(f"{url}/v2/models/mlp/infer", timeout=30, json={
                    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW[0]}]}))
                call("label", lambda: s.post(f"{url}/v1/models/mlp/labels/stable:predict",
                                             json={"instances": ROW}, timeout=30))
                if png:
                    call("digits", lambda: s.post(f"{url}/v1/models/digits:infer", data=png, timeout=30))

    def valid_grpc():
        import tritonclient.grpc as triton
        c = triton.InferenceServerClient(grpc)
        x = triton.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.array(ROW, np.float32))

        class Answer:  # a gRPC answer as `call` counts it
            status_code, text = 200, ""
        while not stop.is_set():
            call("grpc-infer", lambda: (c.infer("mlp", [x], client_timeout=30), Answer)[1])

    def valid_tfs_grpc():
        """TF Serving's own gRPC client: PredictionService/Predict on mlp."""
        import grpc as grpc_lib
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "mlp"
        req.inputs["input"].CopyFrom(tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, float_val=ROW[0],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1), tensor_shape_pb2.TensorShapeProto.Dim(size=4)])))

        class Answer:  # a gRPC answer as `call` counts it
            status_code, text = 200, ""
        with grpc_lib.insecure_channel(grpc) as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            while not stop.is_set():
                call("tfs-grpc", lambda: (stub.Predict(req, timeout=30), Answer)[1])

    def storm_round(s):
        """One request of every hostile kind chosen."""
        sends = {name: (lambda name=name: call(name, lambda: s.post(
            f"{url}/v1/models/{name}:infer", data=b"x", timeout=30), expect_5xx=True)) for name, _, _ in HOSTILE}
        sends.update({
            "huge-echo": lambda: call("huge-echo", lambda: s.post(
                f"{url}/v1/models/echo:infer", data=bytes(3 << 20), timeout=30)),
            "malformed": lambda: call("malformed", lambda: s.post(
                f"{url}/v1/models/mlp:predict", data=b"{not json", timeout=30)),
            "wrong-shape": lambda: call("wrong-shape", lambda: s.post(
                f"{url}/v1/models/mlp:predict", json={"instances": [[1, 2]]}, timeout=30)),
            "unknown": lambda: call("unknown", lambda: s.post(
                f"{url}/v1/models/nope:predict", json={"instances": ROW}, timeout=30)),
            "oversized": lambda: call("oversized", lambda: s.post(
                f"{url}/v1/models/mlp:predict", data=b"[" * (MAX_REQUEST + 1), timeout=30)),
        })
        for kind in kinds:
            sends[kind]()

    def hostile():
        with requests.Session() as s:
            while not stop.is_set():
                if storming():
                    storm_round(s)
                else:
                    stop.wait(0.5)

    def control():
        """Hot swaps, label flips and an upload race, every `swap_every` seconds."""
        auth = {"Authorization": f"Bearer {TOKEN}"}
        version = 1
        while not stop.wait(args.swap_every):
            version += 1
            archive = mlp_archive(version)
            if version % 3 == 0:
                # The race: one new version uploaded twice at once with different content:
                # exactly one 201, the other a 409.
                codes = []
                racers = [threading.Thread(target=lambda body=body: codes.append(requests.post(
                    f"{url}/v1/models/mlp/versions", data=body, headers=auth, timeout=120).status_code))
                    for body in (archive, mlp_archive(version, note="the other racer"))]
                for r in racers:
                    r.start()
                for r in racers:
                    r.join()
                tally.answer("upload-race", tuple(sorted(codes)), expected=sorted(codes) == [201, 409])
            else:
                r = requests.post(f"{url}/v1/models/mlp/versions", data=archive, headers=auth, timeout=120)
                tally.answer("upload", r.status_code, r.text, expected=r.status_code == 201)
            # The label follows the newest version the server serves.
            r = requests.put(f"{url}/v1/models/mlp/labels/stable", json={"version": version}, headers=auth, timeout=30)
            tally.answer("label-flip", r.status_code, r.text, expected=r.status_code == 200)

    def sample():
        while not stop.wait(1.0):
            kib = rss_kib(proc.pid)
            if kib:
                rss.append((elapsed(), kib))

    # Every kind before the clock starts, from as many threads as the storms use, so that
    # one-time costs are in the baseline RSS, not counted as growth: a plugin's first
    # instances, and the Wasm pool's slots, each of which keeps its low 4 MiB resident
    # once used (docs/design.md; the storms' 2 threads use 2 per hostile plugin).
    def warm():
        with requests.Session() as s:
            for _ in range(3):
                storm_round(s)
    warmers = [threading.Thread(target=warm) for _ in range(HOSTILE_THREADS)]
    for t in warmers:
        t.start()
    for t in warmers:
        t.join()
    # The label must exist before clients use it.
    requests.put(f"{url}/v1/models/mlp/labels/stable", json={"version": 1},
                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).raise_for_status()
    threads = ([threading.Thread(target=valid_http) for _ in range(args.clients)]
               + [threading.Thread(target=valid_grpc) for _ in range(2)]
               + [threading.Thread(target=valid_tfs_grpc)]
               + [threading.Thread(target=hostile) for _ in range(HOSTILE_THREADS)]
               + [threading.Thread(target=control), threading.Thread(target=sample)])
    for t in threads:
        t.start()
    def settle(what):
        """Valid traffic and swaps until RSS moves less than 1 % in a minute; its RSS."""
        began = elapsed()
        print(f"== settling ({what}): until RSS moves under {SETTLE_GROWTH - 1:.0%} in "
              f"{SETTLE_WINDOW} s (at most {args.settle_max:.0f} s)", flush=True)
        while elapsed() - began < args.settle_max:
            time.sleep(1)
            now = [k for t, k in rss if t >= elapsed() - 1.5]
            then = [k for t, k in rss if t >= began and abs(t - (elapsed() - SETTLE_WINDOW)) < 1.5]
            # Flat both ways: RSS falling after a burst is not settled either.
            if now and then and then[0] / SETTLE_GROWTH <= now[-1] <= then[0] * SETTLE_GROWTH:
                break
        took = elapsed() - began
        print(f"   {'settled' if took < args.settle_max else 'NOT settled'} after {took:.0f} s: "
              f"RSS {rss[-1][1] / 1024 if rss else 0:.0f} MiB", flush=True)
        return rss[-1][1] if rss else None

    # Before the clock, two settles. First under valid traffic alone: the allocator's
    # thread heaps fill for a minute or two (+30 MiB here, flat after). Then after one
    # warm-up storm as long as the others: the first storm grows what is sized once for
    # its concurrency (plugin slots kept warm, up to plugin_warm_slots; allocator pages)
    # by about 10 %, and later storms add 1-2 % (bench/README.md, session 15). The storms
    # on the clock are measured against the second settle, and the first is printed.
    before_any = settle("valid traffic")
    warm_storm.set()
    time.sleep(period / 2)
    warm_storm.clear()
    after_warm_storm = settle("after a warm-up storm")
    rss.clear()
    t0[0] = time.monotonic()
    settled.set()
    print(f"== soak of {url} and grpc://{grpc} for {args.seconds:.0f} s: storms at "
          + ", ".join(f"{a:.0f}-{b:.0f} s" for a, b in storms)
          + f", calm between and after; a swap every {args.swap_every:.0f} s", flush=True)
    start_rss = warm_rss = None
    after_calm = []
    warm_pool = []  # what the plugin pool's warm slots keep resident, at the same points

    def pool_mib():
        try:
            text = requests.get(f"{url}/metrics", timeout=10).text
        except requests.RequestException:
            return float("nan")
        m = re.search(r"^nnserve_plugin_warm_memory_resident_bytes (\S+)", text, re.M)
        return float(m.group(1)) / 2**20 if m else float("nan")
    while elapsed() < args.seconds:
        time.sleep(1)
        if start_rss is None and elapsed() >= storms[0][0] and rss:
            start_rss = rss[-1][1]  # after the warm-up, before the first storm
            warm_pool.append(pool_mib())
        if warm_rss is None and elapsed() >= baseline_at and rss:
            warm_rss = rss[-1][1]  # after the first storm and its calm
        if len(after_calm) < len(calm_ends) - 1 and elapsed() >= calm_ends[len(after_calm)] and rss:
            after_calm.append(rss[-1][1])
            warm_pool.append(pool_mib())
        if int(elapsed()) % 30 == 0:
            print(f"   {elapsed():5.0f} s  sent {tally.sent:>8}  rss {rss[-1][1] / 1024 if rss else 0:7.1f} MiB",
                  flush=True)
    end_rss = rss[-1][1] if rss else None
    after_calm.append(end_rss or 0)
    warm_pool.append(pool_mib())
    # SIGTERM with the clients still sending: in-flight requests must be answered.
    sigterm_at[0] = elapsed()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    print(f"== {tally.sent} requests sent; server exited {code}")
    print(f"{'kind':<14}{'status':>8}{'answered':>10}")
    for (kind, status), n in sorted(tally.answered.items(), key=str):
        print(f"{kind:<14}{str(status):>8}{n:>10}")
    if tally.failed:
        print(f"{'kind':<14}{'failure':>16}{'count':>8}")
        for (kind, err), n in sorted(tally.failed.items(), key=str):
            print(f"{kind:<14}{err:>16}{n:>8}")
    print("== RSS (MiB) every 15 s: " + ", ".join(f"{t:.0f}s {k / 1024:.0f}" for t, k in rss[::15]))
    print("== of which warm plugin slots (MiB), before the first storm and after each calm: "
          + ", ".join(f"{m:.0f}" for m in warm_pool))
    checks = [
        ("no request lost", not tally.lost, tally.lost[:3]),
        ("server exited 0 after SIGTERM", code == 0, code),
        ("no unexpected 5xx or upload/label answer", not tally.unexpected, tally.unexpected[:5]),
        ("RSS after the storms within 10 % of RSS before them, and of RSS after the first",
         None not in (start_rss, warm_rss, end_rss) and end_rss <= start_rss * 1.10 and end_rss <= warm_rss * 1.10,
         f"{(before_any or 0) / 1024:.0f} MiB before any storm, {(after_warm_storm or 0) / 1024:.0f} after the "
         f"warm-up storm; {(start_rss or 0) / 1024:.0f} before the first on the clock; after each one's calm: "
         + ", ".join(f"{k / 1024:.0f}" for k in after_calm)),
    ]
    ok = True
    for name, passed, detail in checks:
        ok &= bool(passed)
        print(f"{'PASS' if passed else 'FAIL'}  {name}  ({detail})")
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
