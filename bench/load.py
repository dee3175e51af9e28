#!/usr/bin/env python3
"""nnserve under a real load generator (wrk, from Debian's packages) on loopback, beside
the raw limit measured in-process and, with --peer torchserve, TorchServe 0.12 under the
same load; prints tables, asserts nothing.

  .venv/bin/python bench/load.py [--seconds 5] [--suite small|resnet|saturation|tf|all] [--peer torchserve]
      (needs `apt-get install wrk`, `make setup` and `cargo build --release -p nnserve-bench`;
       the resnet suite and the peer need `make bench`'s set-up: bench/requirements.txt and
       bench/make_resnet.py's bundles under bench/work/)

small:  mlp (`:predict`, one row) and digits (`:infer`, a PNG, through its plugin), each
        with batching on and off, at concurrency 1, 8 and 64; with --peer torchserve the same
        on TorchServe (digits through a PIL handler, bench/torchserve_handlers/).
resnet: ResNet-18 (`:infer`, a 256x256 JPEG, through the imagenet-classifier plugin) with
        batching on (resnet18), off (resnet18-nobatch) and with one forward at a time
        (resnet18-bt1: num_batch_threads = 1), at concurrency 1, 2, 8, 16 and 64, with the
        server's default libtorch threads and with --torch-threads 2; first the raw limits
        on the served tensor (1 and 2 intra-op threads, and two OS threads forwarding at
        once), the plugin path in-process, the saturation rounds (raw limit and nnserve at
        c=64 alternating), and a check that the plugin's top-5 matches torchvision's
        preprocessing through the same model.
saturation: only those rounds.
tf:     the TensorFlow backend beside its TorchScript twins in one server: tf-mlp / mlp
        (`:predict`) and digits-tf / digits (`:infer` through the same plugin) at
        concurrency 1, 8 and 64, each against its own backend's raw limit; the TF models
        again with intra-op pools of every core; start-up time and RSS with and without
        the TF models.

Columns: throughput, p50/p90/p99, the mean formed batch size (from /metrics), throughput /
raw limit (at the server's thread setting and that batch size; for resnet also / the best
raw figure of any setting), and at c=1 the p50 minus the raw forward at batch 1 (for
resnet a lone forward at the server's threads measured just before that point, since this
machine's forward drifts by 10 % over minutes; below each c=1 row, free of that drift, the
run's mean latency minus the mean of the forwards the server timed during it).
wrk runs one thread, so it takes one of the machine's cores where the server lets it.

Every timed step first waits (up to 10 minutes) until no cargo, rustc or pytest process runs
and the CPU is mostly idle, since other builds share the 2 cores; a row measured while one
ran is marked `*`."""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "bench"))
# The release binaries (NNSERVE_BENCH_BIN: another build's target/release).
BIN = os.environ.get("NNSERVE_BENCH_BIN", os.path.join(ROOT, "target", "release"))
NNSERVE = os.path.join(BIN, "nnserve")
BENCH = os.path.join(BIN, "nnserve-bench")
EXAMPLES = os.path.join(ROOT, "examples", "repository")
WORK = os.path.join(ROOT, "bench", "work")
BUSY = ("cargo", "rustc")
# TorchServe's batch delay: nnserve's bundles wait 0 extra, but TorchServe 0.12 takes a
# maxBatchDelay of 0 as its 100 ms default (measured: 105 ms p50 for a lone mlp request),
# so its closest setting, 1 ms.
TS_DELAY_MS = 1


def busy():
    """Whether another build or test run is using the machine now."""
    procs = [p for name in BUSY for p in subprocess.run(["pgrep", "-x", name], capture_output=True,
                                                        text=True).stdout.split()]
    procs += subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True).stdout.split()
    return bool(procs)


def cpu_idle(seconds=1.0):
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])
    i0, t0 = read()
    time.sleep(seconds)
    i1, t1 = read()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit=600):
    """Waits until no build/test runs and the CPU is >= 85% idle; False if it never got so."""
    start = time.time()
    while time.time() - start < limit:
        if not busy() and cpu_idle() >= 0.85:
            return True
        time.sleep(2)
    print(f"   (still busy after {limit} s: measuring under contention)")
    return False


def raw_limit(bundle, threads=1, parallel=1, seconds=1, input_file=None, batches=(1, 8, 32, 64)):
    wait_quiet()
    env = dict(os.environ, NNSERVE_BENCH_THREADS=str(threads), NNSERVE_BENCH_PARALLEL=str(parallel),
               NNSERVE_BENCH_SECONDS=str(seconds), NNSERVE_BENCH_BATCHES=",".join(map(str, batches)))
    if input_file:
        env["NNSERVE_BENCH_INPUT"] = input_file
    run = subprocess.run([BENCH, "raw", bundle], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        sys.exit(f"nnserve-bench raw failed:\n{run.stderr}")
    out = run.stdout
    return {int(b): (float(r), float(p50)) for b, r, p50 in re.findall(r"RAW (\d+) ([\d.]+) ([\d.]+)", out)}


def saturation(args, bundle, image, tensor):
    """The saturation ratio, measured side by side: rounds of the raw limit at batch 8 (two
    settings) and nnserve with its default threads at `--saturation-clients` (64: enough
    that both forward slots always find a full batch of 8 queued; at 16 the batches
    average under 5 rows, which measures batch formation, not saturation), alternating,
    so that this machine's drift (the forward varies by 10 % over minutes) hits both
    sides alike.
    resnet18 (the server's choice: a batch thread per core, the cores shared, so 1 libtorch
    thread each under load) is held against 2 forwards x 1 thread, resnet18-bt1
    (num_batch_threads = 1, so every core's thread in one forward) against 1 forward x 2."""
    models = args.saturation_models
    print(f"== Saturation side by side ({args.rounds} rounds): raw limit at batch 8 on the served tensor,"
          f" then nnserve (default threads) at c={args.saturation_clients} on {', '.join(models)}")
    server, url = start_nnserve(os.path.join(WORK, "repository"))
    ratios = {m: [] for m in models}
    try:
        for r in range(args.rounds):
            t2 = raw_limit(bundle, 2, 1, args.raw_seconds, tensor, batches=(8,))[8][0]
            t1x2 = raw_limit(bundle, 1, 2, args.raw_seconds, tensor, batches=(8,))[8][0]
            print(f"   round {r + 1}{'*' if busy() else ''}: raw 1 forward x 2 threads {t2:.1f} rows/s,"
                  f" 2 forwards x 1 thread {t1x2:.1f}", flush=True)
            for model in models:
                same = t2 if model.endswith("-bt1") else t1x2
                wait_quiet()
                seconds = args.saturation_seconds
                # The steady state, as the raw limit measures it after its warm-up: requests
                # answered between 2 s after the start (the first batches form from clients
                # arriving one by one) and 1 s before the end.
                started = time.monotonic()
                run = concurrent.futures.ThreadPoolExecutor(1).submit(
                    wrk, url, f"/v1/models/{model}:infer", image, "image/jpeg", args.saturation_clients, seconds)
                time.sleep(2)
                w0, c0 = time.monotonic(), answered(url, model)
                f0, _ = compute_stats(url, model)
                s0, n0 = batch_stats(url, model)
                time.sleep(max(0.0, started + seconds - 1 - time.monotonic()))
                w1, c1 = time.monotonic(), answered(url, model)
                f1, _ = compute_stats(url, model)
                s1, n1 = batch_stats(url, model)
                rps, errors, p50, _, p99, _ = run.result()
                steady = (c1 - c0) / (w1 - w0)
                running = (f1 - f0) / (w1 - w0)
                batch = (s1 - s0) / max(n1 - n0, 1)
                ratios[model].append((steady / same, steady / max(t2, t1x2)))
                print(f"      {model}{'*' if busy() else ''}: {steady:.1f} req/s in the steady window"
                      f" ({rps:.1f} over wrk's whole run; p50 {p50 / 1000:.1f} ms, p99 {p99 / 1000:.1f} ms,"
                      f" {errors} errors), batch {batch:.2f}, forward time / wall {running:.2f}:"
                      f" {steady / same:.3f} of its raw setting, {steady / max(t2, t1x2):.3f} of the best", flush=True)
    finally:
        stop(server)
    med = lambda v: sorted(v)[len(v) // 2]
    for model, v in ratios.items():
        print(f"   {model} median: {med([a for a, _ in v]):.3f} of the raw limit at its setting,"
              f" {med([b for _, b in v]):.3f} of the best raw setting of the same round")


def answered(url, model):
    """nnserve_requests_total{outcome="ok"} of `model` version 1."""
    return metric_sums(url, model, ["nnserve_requests_total"], ',outcome="ok"')[0]


def metric_sums(url, model, names, labels=""):
    """Values of `names` for `model` version 1 (and any further `labels`) in /metrics."""
    text = requests.get(f"{url}/metrics").text
    def val(name):
        m = re.search(rf'{name}{{model="{model}",version="1"{labels}}} ([\d.e+-]+)', text)
        return float(m.group(1)) if m else 0.0
    return [val(n) for n in names]


def batch_stats(url, model):
    return metric_sums(url, model, ["nnserve_batch_size_sum", "nnserve_batch_size_count"])


def compute_stats(url, model):
    return metric_sums(url, model, ["nnserve_compute_duration_seconds_sum",
                                    "nnserve_compute_duration_seconds_count"])


def wrk(url, path, body_file, content_type, conns, seconds):
    env = dict(os.environ, BODY_FILE=body_file, CONTENT_TYPE=content_type)
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "30s",
                          "-s", os.path.join(ROOT, "bench", "post.lua"), url + path],
                         capture_output=True, text=True, env=env, check=True).stdout
    n, dur_us, errors, p50, p90, p99, mean = re.search(
        r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)", out).groups()
    return int(n) / (int(dur_us) / 1e6), int(errors), float(p50), float(p90), float(p99), float(mean)


HEADER = (f"{'server / model':<28}{'c':>4}{'req/s':>10}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}{'errors':>7}"
          f"{'batch':>7}{'of raw':>8}{'of best':>8}{'+p50 us':>9}")


def point(url, label, model, path, body, ctype, c, seconds, raw=None, best=None, metrics=True, lone=None):
    """One wrk run; prints its row and returns it. `raw`: rows/s and p50 by batch size of the
    setting under load; `lone`: the p50 of a lone batch-1 forward, for the c=1 overhead
    (default: raw's batch 1)."""
    quiet = wait_quiet()
    s0, n0 = batch_stats(url, model) if metrics else (0, 0)
    f0, k0 = compute_stats(url, model) if metrics and c == 1 else (0, 0)
    seen = []  # a build or test that started during the run marks the row
    done = threading.Event()
    def watch():
        while not done.wait(0.5):
            if busy():
                seen.append(True)
                return
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rps, errors, p50, p90, p99, mean = wrk(url, path, body, ctype, c, seconds)
    finally:
        done.set()
        watcher.join()
    s1, n1 = batch_stats(url, model) if metrics else (0, 0)
    f1, k1 = compute_stats(url, model) if metrics and c == 1 else (0, 0)
    contended = not quiet or bool(seen)
    batch = (s1 - s0) / (n1 - n0) if n1 > n0 else None
    row = dict(label=label, c=c, rps=rps, p50=p50, p90=p90, p99=p99, errors=errors, batch=batch)
    ratio = of_best = overhead = None
    if raw:
        size = min((b for b in raw if b >= (batch or 1)), default=max(raw))
        ratio = rps / raw[size][0]
        if c == 1:
            overhead = p50 - (lone if lone is not None else raw[1][1])
    if best:
        of_best = rps / best
    row.update(ratio=ratio, of_best=of_best, overhead=overhead)
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    print(f"{label + ('*' if contended else ''):<28}{c:>4}{rps:>10,.1f}{p50:>10.1f}{p90:>10.1f}{p99:>10.1f}{errors:>7}"
          f"{f(batch, '.2f'):>7}{f(ratio, '.3f'):>8}{f(of_best, '.3f'):>8}{f(overhead, '.1f'):>9}", flush=True)
    if k1 > k0:
        # Immune to the drift: the forwards this very run made, timed inside the server
        # (means on both sides: /metrics has sums, and a mean is not biased by the tail).
        forward = (f1 - f0) / (k1 - k0) * 1e6
        row["served_overhead"] = mean - forward
        print(f"   (this run: mean latency {mean / 1000:.2f} ms, mean forward timed in the server"
              f" {forward / 1000:.2f} ms: {(mean - forward) / 1000:.2f} ms around the forward)", flush=True)
    return row


def start_nnserve(repo, threads=None):
    cmd = [NNSERVE, "serve", "-r", repo, "-l", "127.0.0.1:0", "--log", "warn", "--config", "/dev/null"]
    if threads is not None:
        cmd += ["--torch-threads", str(threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = next(re.search(r"listening on (http://\S+)", line).group(1)
               for line in server.stdout if "listening on" in line)
    return server, url


def stop(server):
    server.terminate()
    server.wait()


def ratios(ours, peer, title):
    print(f"== nnserve / TorchServe, {title}")
    print(f"{'model':<22}{'c':>4}{'req/s ratio':>13}{'p99 ratio':>11}   (p99 ratio < 1: nnserve's tail is shorter)")
    for key, row in ours.items():
        if key in peer:
            p = peer[key]
            print(f"{key[0]:<22}{key[1]:>4}{row['rps'] / p['rps']:>13.2f}{row['p99'] / p['p99']:>11.3f}")


def copy_without_batching(repo, name):
    """examples/NAME as NAME-nobatch in `repo`, its [batching] table left out."""
    d = os.path.join(repo, f"{name}-nobatch", "1")
    shutil.copytree(os.path.join(EXAMPLES, name, "1"), d)
    kept, skipping = [], False
    with open(os.path.join(d, "bundle.toml")) as f:
        for line in f:
            if re.match(r"\[\w", line):
                skipping = line.startswith("[batching]")
            if not skipping:
                kept.append(line)
    text = "".join(kept).replace(f'name = "{name}"', f'name = "{name}-nobatch"', 1)
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(text)


def request_bodies(tmp):
    """The load's bodies in `tmp`: one mlp row as JSON, and a drawn 7 as a PNG."""
    mlp_body = os.path.join(tmp, "mlp.json")
    with open(mlp_body, "w") as f:
        f.write('{"instances": [[1.0, 2.0, 3.0, 4.0]]}')
    png = os.path.join(tmp, "digit.png")
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "draw_digit.py"), "7", png],
                   check=True, capture_output=True)
    return mlp_body, png


def small_suite(args, tmp):
    repo = os.path.join(tmp, "repo")
    shutil.copytree(os.path.join(EXAMPLES, "mlp"), os.path.join(repo, "mlp"))
    shutil.copytree(os.path.join(EXAMPLES, "digits"), os.path.join(repo, "digits"))
    copy_without_batching(repo, "mlp")
    copy_without_batching(repo, "digits")
    mlp_body, png = request_bodies(tmp)
    raw = {"mlp": raw_limit(os.path.join(EXAMPLES, "mlp", "1")),
           "digits": raw_limit(os.path.join(EXAMPLES, "digits", "1"))}
    raw["mlp-nobatch"] = raw["mlp"]
    raw["digits-nobatch"] = raw["digits"]
    print(f"== {os.cpu_count()} cores; raw limit in-process (1 thread), rows/s (p50 per forward):")
    for m in ("mlp", "digits"):
        print(f"   {m:<7} " + "  ".join(f"b{b}: {r:,.0f} ({p:.1f} us)" for b, (r, p) in sorted(raw[m].items())))
    server, url = start_nnserve(repo)
    ours = {}
    try:
        with open(png, "rb") as f:
            digits_answer = requests.post(f"{url}/v1/models/digits:infer", data=f.read(),
                                          headers={"Content-Type": "image/png"}).json()["predictions"]
        print(HEADER)
        for model, path, body, ctype in (("mlp", "/v1/models/mlp:predict", mlp_body, "application/json"),
                                         ("mlp-nobatch", "/v1/models/mlp-nobatch:predict", mlp_body, "application/json"),
                                         ("digits", "/v1/models/digits:infer", png, "image/png"),
                                         ("digits-nobatch", "/v1/models/digits-nobatch:infer", png, "image/png")):
            for c in (1, 8, 64):
                ours[(model, c)] = point(url, model, model, path, body, ctype, c, args.seconds, raw[model])
    finally:
        stop(server)
    if args.peer == "torchserve":
        import torchserve
        work = os.path.join(WORK, "torchserve")
        torchserve.reset(work)
        mlp_pt = os.path.join(EXAMPLES, "mlp", "1", "model", "model.pt")
        for name in ("mlp", "mlp-nobatch"):
            torchserve.archive(work, name, mlp_pt, "mlp_handler.py")
        for name in ("digits", "digits-nobatch"):
            torchserve.archive(work, name, os.path.join(EXAMPLES, "digits", "1", "model", "model.pt"),
                               "digits_handler.py")
        # Same batching as the bundles (mlp 64 rows, digits 32, nearly no extra wait:
        # TorchServe 0.12 takes maxBatchDelay 0 as its 100 ms default, measured); 2 workers,
        # 1 torch thread each.
        ts = torchserve.TorchServe(work, {"mlp": dict(workers=2, batch_size=64, max_batch_delay_ms=TS_DELAY_MS),
                                          "mlp-nobatch": dict(workers=2, batch_size=1, max_batch_delay_ms=0),
                                          "digits": dict(workers=2, batch_size=32, max_batch_delay_ms=TS_DELAY_MS),
                                          "digits-nobatch": dict(workers=2, batch_size=1, max_batch_delay_ms=0)})
        peer = {}
        try:
            url = ts.start()
            print(f"== TorchServe 0.12, 2 workers x 1 torch thread, mlp batch 64 / {TS_DELAY_MS} ms and no batching,"
                  f" digits batch 32 / {TS_DELAY_MS} ms and no batching (a PIL handler:"
                  " bench/torchserve_handlers/digits_handler.py)")
            check_digits(url, png, digits_answer)
            print(HEADER)
            for model, body, ctype in (("mlp", mlp_body, "application/json"),
                                       ("mlp-nobatch", mlp_body, "application/json"),
                                       ("digits", png, "image/png"),
                                       ("digits-nobatch", png, "image/png")):
                for c in (1, 8, 64):
                    peer[(model, c)] = point(url, f"ts {model}", model, f"/predictions/{model}", body,
                                             ctype, c, args.seconds, raw[model], metrics=False)
        finally:
            ts.stop()
        ratios(ours, peer, "mlp and digits")


def tf_suite(args, tmp):
    """The TensorFlow backend beside its TorchScript twins, in one server under the same wrk
    load: tf-mlp / mlp over :predict, digits-tf / digits through the same image-classifier
    plugin; each against its own raw in-process limit (`nnserve-bench raw`: the backend's
    forward in a loop, 1 intra-op thread, as the server runs a quick model). Also start-up
    time and RSS with and without TF models loaded."""
    repo = os.path.join(tmp, "tf-repo")
    for m in ("mlp", "tf-mlp", "digits", "digits-tf"):
        shutil.copytree(os.path.join(EXAMPLES, m), os.path.join(repo, m))
    torch_only = os.path.join(tmp, "torch-repo")
    for m in ("mlp", "digits"):
        shutil.copytree(os.path.join(EXAMPLES, m), os.path.join(torch_only, m))
    mlp_body, png = request_bodies(tmp)
    raw = {m: raw_limit(os.path.join(EXAMPLES, m, "1")) for m in ("mlp", "tf-mlp", "digits", "digits-tf")}
    print(f"== {os.cpu_count()} cores; raw limit in-process (1 thread), rows/s (p50 per forward):")
    for m, r in raw.items():
        print(f"   {m:<10} " + "  ".join(f"b{b}: {x:,.0f} ({p:.1f} us)" for b, (x, p) in sorted(r.items())))
    for label, path in (("torch models only", torch_only), ("with tf-mlp and digits-tf", repo)):
        wait_quiet()
        t0 = time.monotonic()
        server, url = start_nnserve(path)
        ready = time.monotonic() - t0
        rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{server.pid}/status").read()).group(1)) / 1024
        stop(server)
        print(f"   start-up to listening, {label}: {ready:.2f} s; RSS {rss:,.0f} MiB")
    server, url = start_nnserve(repo)
    try:
        print(HEADER)
        for model, path, body, ctype in (("mlp", "/v1/models/mlp:predict", mlp_body, "application/json"),
                                         ("tf-mlp", "/v1/models/tf-mlp:predict", mlp_body, "application/json"),
                                         ("digits", "/v1/models/digits:infer", png, "image/png"),
                                         ("digits-tf", "/v1/models/digits-tf:infer", png, "image/png")):
            for c in (1, 8, 64):
                point(url, model, model, path, body, ctype, c, args.seconds, raw[model])
    finally:
        stop(server)
    # TF's intra-op pool per session: 1 thread (the default above) against the cores.
    server, url = start_nnserve(repo, threads=os.cpu_count())
    try:
        print(f"== the TF models again with --torch-threads {os.cpu_count()} (TF intra-op pools of every core)")
        print(HEADER)
        for model, path, body, ctype in (("tf-mlp", "/v1/models/tf-mlp:predict", mlp_body, "application/json"),
                                         ("digits-tf", "/v1/models/digits-tf:infer", png, "image/png")):
            for c in (1, 64):
                point(url, f"{model} t{os.cpu_count()}", model, path, body, ctype, c, args.seconds, raw[model])
    finally:
        stop(server)


def check_digits(url, png, ours):
    """TorchServe's answer for the load's digit beside nnserve's: the same classes in the same
    order, scores within 1e-3 (the two resize and round differently), or the comparison is void."""
    with open(png, "rb") as f:
        theirs = requests.post(f"{url}/predictions/digits", data=f.read(),
                               headers={"Content-Type": "image/png"}).json()["predictions"]
    same = [p["label"] for p in ours] == [p["label"] for p in theirs] and all(
        abs(a["score"] - b["score"]) < 1e-3 for a, b in zip(ours, theirs))
    print(f"   digits: nnserve {[(p['label'], round(p['score'], 4)) for p in ours]},"
          f" TorchServe {[(p['label'], round(p['score'], 4)) for p in theirs]}: {'same' if same else 'DIFFERENT'}")
    if not same:
        sys.exit("the digits handlers disagree: fix bench/torchserve_handlers/digits_handler.py first")


def check_agreement(url):
    """The plugin's top-5 against torchvision's (bench/make_resnet.py wrote reference.json)."""
    with open(os.path.join(WORK, "reference.json")) as f:
        reference = json.load(f)
    for name, ref in reference.items():
        with open(os.path.join(WORK, name), "rb") as f:
            got = requests.post(f"{url}/v1/models/resnet18:infer", data=f.read(),
                                headers={"Content-Type": "image/jpeg"}).json()["predictions"]
        same = [g["label"] for g in got] == [r["label"] for r in ref]
        diff = max(abs(g["score"] - r["score"]) for g, r in zip(got, ref))
        rel = max(abs(g["score"] - r["score"]) / r["score"] for g, r in zip(got, ref))
        print(f"   {name}: top-5 labels {'identical' if same else 'DIFFER'} to torchvision's; "
              f"largest score difference {diff:.2e} ({rel * 100:.2f}% of the score)")


def raw_setting(raw, model, threads):
    """The raw figures (by batch size) of the setting the server uses for `model` under load
    with `--torch-threads threads` (None: its default) on 2 cores, and the p50 of a lone
    batch-1 forward at that setting (what c=1 pays)."""
    one_at_a_time = model.endswith("-bt1")
    if threads is None:  # shared threads: a lone forward gets both cores, two get one each
        return (raw[(2, 1)] if one_at_a_time else raw[(1, 2)]), raw[(2, 1)][1][1]
    if threads == 1:  # fixed 1 thread: one forward per core
        return (raw[(1, 1)] if one_at_a_time else raw[(1, 2)]), raw[(1, 1)][1][1]
    return raw[(2, 1)], raw[(2, 1)][1][1]


def resnet_paths():
    """The resnet18 bundle, the request image and its preprocessed tensor (bench/make_resnet.py)."""
    bundle = os.path.join(WORK, "repository", "resnet18", "1")
    image = os.path.join(WORK, "image-256.jpg")
    tensor = os.path.join(WORK, "image-256.input.bin")
    if not os.path.exists(os.path.join(bundle, "plugins", "handler.wasm")) or not os.path.exists(tensor):
        sys.exit("bench/work/ lacks the ResNet bundles or image-256.input.bin: run `make bench-setup`")
    return bundle, image, tensor


def resnet_suite(args):
    bundle, image, tensor = resnet_paths()
    print("== ResNet-18 raw limit in-process ([b,3,224,224]: the load's image, preprocessed by"
          " torchvision, repeated b times), rows/s (p50 per forward):")
    raw = {}
    for threads, parallel in ((1, 1), (2, 1), (1, 2)):
        r = raw_limit(bundle, threads, parallel, seconds=args.raw_seconds, input_file=tensor)
        raw[(threads, parallel)] = r
        print(f"   intra-op {threads}, {parallel} forward(s) at once{'*' if busy() else ''}: "
              + "  ".join(f"b{b}: {v:,.1f} ({p / 1000:.1f} ms)" for b, (v, p) in sorted(r.items())), flush=True)
    best = max(v for r in raw.values() for v, _ in r.values())
    print(f"   best: {best:,.1f} rows/s")

    print("== The plugin path in-process (nnserve-bench plugin, 1 libtorch thread)")
    for b, n in ((os.path.join(WORK, "stub", "imagenet-stub", "1"), 1000), (bundle, 40)):
        wait_quiet()
        # The raw forward beside the calls runs on the served tensor, as the limit does.
        out = subprocess.run([BENCH, "plugin", b, image, str(n)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, NNSERVE_BENCH_INPUT=tensor)).stdout
        for line in out.splitlines():
            if line.startswith(("answer (warm)", "imagenet-stub:", "resnet18:")):
                print("   " + line)

    saturation(args, bundle, image, tensor)

    # TorchServe runs beside nnserve, and each of its points follows nnserve's point of the
    # same model and concurrency: this machine drifts by 10-25 % over minutes, so points
    # measured in two passes minutes apart compared the drift as much as the servers.
    # (Both idle while the other is loaded.)
    ts, ts_url, peer = None, None, {}
    ts_base = ("2 workers x 1 torch thread", 2, 1, TS_DELAY_MS)
    ts_models = ("resnet18", "resnet18-nobatch")
    if args.peer == "torchserve":
        import torchserve
        work = os.path.join(WORK, "torchserve")
        torchserve.reset(work)
        model_pt = os.path.join(bundle, "model", "model.pt")
        for name in ts_models:
            torchserve.archive(work, name, model_pt, "resnet_handler.py")

        def start_ts(workers, threads, delay):
            server = torchserve.TorchServe(work, {
                "resnet18": dict(workers=workers, batch_size=8, max_batch_delay_ms=delay),
                "resnet18-nobatch": dict(workers=workers, batch_size=1, max_batch_delay_ms=delay)},
                torch_threads=threads)
            return server, server.start()

        def ts_point(url, title, workers, threads, model, c):
            row = point(url, f"ts {model} ({workers}x{threads or 'd'})", model, f"/predictions/{model}",
                        image, "image/jpeg", c, args.seconds, raw[(1, 1)], best, metrics=False)
            peer[(model, c, title)] = row

        ts, ts_url = start_ts(*ts_base[1:])
    ours = {}
    try:
        for threads in args.torch_threads:
            t = None if threads == "default" else int(threads)
            server, url = start_nnserve(os.path.join(WORK, "repository"), t)
            label = "default (auto)" if t is None else str(t)
            beside = ts is not None and threads == args.torch_threads[0]
            try:
                if threads == args.torch_threads[0]:
                    print("== The plugin's answers against torchvision's preprocessing, same model")
                    check_agreement(url)
                print(f"== nnserve, libtorch intra-op threads {label}: a 256x256 JPEG per request"
                      + (f"; each point followed by TorchServe 0.12's ({ts_base[0]}; resnet18: batch 8 /"
                         f" {TS_DELAY_MS} ms, resnet18-nobatch: batch 1)" if beside else ""))
                print(HEADER)
                for model in ("resnet18", "resnet18-nobatch", "resnet18-bt1"):
                    r, lone = raw_setting(raw, model, t)
                    for c in args.resnet_concurrency:
                        if c == 1:
                            # The forward drifts by 10 % over minutes here: c=1's overhead is
                            # taken against a lone batch-1 forward measured just before.
                            lone = raw_limit(os.path.join(WORK, "repository", model, "1"),
                                             threads=t or os.cpu_count(), seconds=3,
                                             input_file=os.path.join(WORK, "image-256.input.bin"),
                                             batches=(1,))[1][1]
                            print(f"   (raw batch-1 forward just before, {t or os.cpu_count()} threads:"
                                  f" p50 {lone / 1000:.2f} ms)", flush=True)
                        row = point(url, f"{model} t={t or 'auto'}", model, f"/v1/models/{model}:infer", image,
                                    "image/jpeg", c, args.seconds, r, best, lone=lone)
                        ours[(model, c, label)] = row
                        if beside and model in ts_models:
                            ts_point(ts_url, ts_base[0], ts_base[1], ts_base[2], model, c)
            finally:
                stop(server)
    finally:
        if ts is not None:
            ts.stop()

    if args.peer == "torchserve":
        if args.ts_defaults:
            # TorchServe's own defaults: one worker per core, torch's default threads (one per
            # core), in a pass of its own after nnserve's.
            title = "defaults: 2 workers x torch default threads"
            ts, url = start_ts(2, 0, TS_DELAY_MS)
            try:
                print(f"== TorchServe 0.12, {title}; resnet18: batch 8 / {TS_DELAY_MS} ms, resnet18-nobatch: batch 1")
                print(HEADER)
                for model in ts_models:
                    for c in args.resnet_concurrency:
                        ts_point(url, title, 2, 0, model, c)
            finally:
                ts.stop()
        base = ts_base[0]
        for label in sorted({k[2] for k in ours}):
            mine = {(m, c): row for (m, c, l), row in ours.items() if l == label}
            theirs = {(m, c): row for (m, c, l), row in peer.items() if l == base}
            side = "measured side by side" if label == "default (auto)" else "TorchServe's points from the first pass"
            ratios(mine, theirs, f"resnet, nnserve threads {label} vs TorchServe {base} ({side})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per point")
    ap.add_argument("--raw-seconds", type=float, default=3, help="resnet raw limit: seconds per batch size")
    ap.add_argument("--suite", choices=("small", "resnet", "saturation", "tf", "all"), default="small",
                    help="saturation: only the resnet side-by-side saturation rounds")
    ap.add_argument("--peer", choices=("none", "torchserve"), default="none")
    ap.add_argument("--torch-threads", nargs="+", default=["default", "2"],
                    help="resnet: server --torch-threads settings to measure ('default': the server's own)")
    ap.add_argument("--rounds", type=int, default=3, help="resnet saturation: raw/nnserve rounds")
    ap.add_argument("--saturation-models", nargs="+", default=["resnet18", "resnet18-bt1"],
                    help="resnet saturation: the bundles to load")
    ap.add_argument("--saturation-seconds", type=int, default=20,
                    help="resnet saturation: wrk's run per model and round (the rate is taken from 2 s in to 1 s before its end)")
    ap.add_argument("--saturation-clients", type=int, default=64,
                    help="resnet saturation: wrk connections (64: full batches of 8 on both slots)")
    ap.add_argument("--resnet-concurrency", type=int, nargs="+", default=[1, 2, 8, 16, 64])
    ap.add_argument("--ts-defaults", action="store_true", help="also TorchServe with its default threads")
    args = ap.parse_args()
    if args.saturation_seconds < 5:
        ap.error("--saturation-seconds must be at least 5 (the rate is taken from 2 s in to 1 s before the end)")
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    tmp = tempfile.mkdtemp()
    try:
        if args.suite in ("small", "all"):
            small_suite(args, tmp)
        if args.suite in ("resnet", "all"):
            resnet_suite(args)
        if args.suite == "saturation":
            saturation(args, *resnet_paths())
        if args.suite in ("tf", "all"):
            tf_suite(args, tmp)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
