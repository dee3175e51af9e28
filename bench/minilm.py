#!/usr/bin/env python3
"""all-MiniLM-L6-v2 sentence embeddings (examples/repository/minilm, the text-embedder
plugin) beside the same model in sentence-transformers behind a minimal Python HTTP
server (bench/st_server.py), in one run on one machine; prints tables, asserts nothing.

  .venv/bin/python bench/minilm.py [--seconds 5] [--concurrency 1,8,32]
      (needs `make setup` and `cargo build --release -p nnserve-load`)

1. Latency on loopback, one client, sequential requests: p50 for one sentence and for 32
   sentences in one request, split by the plugin's Server-Timing header into tokenise,
   model (queue and forward) and pool, and the same with `init = false` (the tokenizer
   parsed in every request) to show what the one-time setup saves.
2. Instantiation: p50 of a request the plugin refuses at once (`{"texts": []}`, a 400 after
   instantiating the plugin and reading its config) minus p50 of `/v2/health/live` (no
   plugin), and the plugin's and its snapshot's sizes.
3. Throughput at each concurrency, one sentence per request, `nnserve-load` (one-thread
   HTTP/1.1 keep-alive loop) against nnserve and against the sentence-transformers server,
   with the mean batch size nnserve formed (`/metrics`).

Every timed step first waits until no cargo, rustc or pytest process runs and the CPU is
mostly idle (bench/load.py's rule); a row measured while one ran is marked `*`."""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the shared helpers: quiet waits, servers, metrics)

ROOT = load.ROOT
LOADGEN = os.path.join(load.BIN, "nnserve-load")
MINILM = os.path.join(load.EXAMPLES, "minilm", "1")
SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog does not mind at all."
BATCH = [f"Sentence {i} of the batch: {SENTENCE}" for i in range(32)]


def repository(tmp):
    """minilm as exported, and minilm-noinit: the same files with `init = false`."""
    repo = os.path.join(tmp, "repo")
    os.makedirs(os.path.join(repo, "minilm"))
    os.symlink(MINILM, os.path.join(repo, "minilm", "1"))
    noinit = os.path.join(repo, "minilm-noinit", "1")
    os.makedirs(noinit)
    for part in ("model", "assets", "plugins"):
        shutil.copytree(os.path.join(MINILM, part), os.path.join(noinit, part))
    with open(os.path.join(MINILM, "bundle.toml")) as f:
        toml = f.read().replace('name = "minilm"', 'name = "minilm-noinit"').replace("init = true", "init = false")
    with open(os.path.join(noinit, "bundle.toml"), "w") as f:
        f.write(toml)
    return repo


def timings(header):
    """{"tokenize": ms, "model": ms, "pool": ms} from a Server-Timing header."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+);dur=([\d.]+)", header or "")}


def latency(url, model, body, n):
    """p50 of n sequential requests, and the median of each Server-Timing part."""
    load.wait_quiet()
    mark = "" if not load.busy() else "*"
    total, parts = [], {}
    with requests.Session() as s:
        for _ in range(n):
            t = time.perf_counter()
            r = s.post(f"{url}/v1/models/{model}:infer", json=body, timeout=60)
            total.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
            for k, v in timings(r.headers.get("server-timing")).items():
                parts.setdefault(k, []).append(v)
    return mark, statistics.median(total), {k: statistics.median(v) for k, v in parts.items()}


def p50(session, method, url, n, **kw):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        session.request(method, url, timeout=30, **kw)
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def throughput(target, body, c, seconds):
    load.wait_quiet()
    mark = "" if not load.busy() else "*"
    out = subprocess.run([LOADGEN, target, "--body", body, "--concurrency", str(c), "--seconds", str(seconds),
                          "--header", "content-type: application/json"],
                         capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        sys.exit(f"nnserve-load failed: {out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return mark, r


def start_st():
    """bench/st_server.py on an ephemeral loopback port; returns (process, url)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "st_server.py")],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = next(re.search(r"listening on (http://\S+)", line).group(1) for line in proc.stdout if "listening on" in line)
    return proc, url


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=60, help="sequential requests per latency row")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = tempfile.mkdtemp(prefix="nnserve-minilm-bench-")
    one = os.path.join(tmp, "one.json")
    with open(one, "w") as f:
        json.dump({"texts": [SENTENCE]}, f)
    try:
        started = time.time()
        server, url = load.start_nnserve(repository(tmp))
        print(f"== nnserve {url} (minilm and minilm-noinit loaded in {time.time() - started:.1f} s)", flush=True)
        try:
            print("== latency, one client, p50 of sequential requests (ms); the parts are the plugin's Server-Timing")
            print(f"{'bundle':<15}{'request':<14}{'p50':>8}{'tokenize':>10}{'model':>8}{'pool':>7}{'tokenize %':>12}")
            for model in ("minilm", "minilm-noinit"):
                for label, body, n in (("1 sentence", {"texts": [SENTENCE]}, args.requests),
                                       ("32 sentences", {"texts": BATCH}, max(10, args.requests // 4))):
                    mark, p, parts = latency(url, model, body, n)
                    share = 100 * parts.get("tokenize", 0) / p
                    print(f"{model + mark:<15}{label:<14}{p:>8.2f}{parts.get('tokenize', 0):>10.2f}"
                          f"{parts.get('model', 0):>8.2f}{parts.get('pool', 0):>7.2f}{share:>11.1f}%", flush=True)
            with requests.Session() as s:
                load.wait_quiet()
                refused = p50(s, "POST", f"{url}/v1/models/minilm:infer", 200, json={"texts": []})
                live = p50(s, "GET", f"{url}/v2/health/live", 200)
            plugin = os.path.getsize(os.path.join(MINILM, "plugins", "handler.wasm"))
            print(f"== plugin: {plugin / 1e6:.1f} MB component; instantiate + config + a refused body: "
                  f"{refused - live:.2f} ms (p50 {refused:.2f} ms of a 400 minus {live:.2f} ms of /v2/health/live)",
                  flush=True)
            print(f"== throughput, one sentence per request, nnserve-load, {args.seconds} s per row")
            print(f"{'server':<24}{'c':>4}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'mean batch':>12}")
            ours = {}
            for c in levels:
                before = load.batch_stats(url, "minilm")
                mark, r = throughput(f"{url}/v1/models/minilm:infer", one, c, args.seconds)
                after = load.batch_stats(url, "minilm")
                rows, batches = after[0] - before[0], after[1] - before[1]
                mean = rows / batches if batches else 0
                ours[c] = r
                print(f"{'nnserve' + mark:<24}{c:>4}{r['rps']:>9.1f}{r['p50_us'] / 1000:>9.2f}"
                      f"{r['p99_us'] / 1000:>9.2f}{r['errors']:>8}{mean:>12.2f}", flush=True)
        finally:
            load.stop(server)
        st, st_url = start_st()
        try:
            peer = {}
            for c in levels:
                mark, r = throughput(f"{st_url}/embed", one, c, args.seconds)
                peer[c] = r
                print(f"{'sentence-transformers' + mark:<24}{c:>4}{r['rps']:>9.1f}{r['p50_us'] / 1000:>9.2f}"
                      f"{r['p99_us'] / 1000:>9.2f}{r['errors']:>8}{'':>12}", flush=True)
        finally:
            st.terminate()
            st.wait()
        print("== nnserve / sentence-transformers")
        for c in levels:
            if peer[c]["rps"]:
                print(f"   c={c:<3} req/s x{ours[c]['rps'] / peer[c]['rps']:.2f}, "
                      f"p50 x{ours[c]['p50_us'] / max(1, peer[c]['p50_us']):.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
