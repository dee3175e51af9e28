#!/usr/bin/env python3
"""nnserve under a real load generator (wrk, from Debian's packages) on loopback, beside
the raw limit measured in-process; prints a table, asserts nothing.

  .venv/bin/python bench/load.py [--seconds 5]     (needs `apt-get install wrk`, `make setup`
                                                    and `cargo build --release -p nnserve-bench`)

For mlp (`:predict`, one row) with batching on and off, and digits (`:infer`, a PNG, through
its plugin), at concurrency 1, 8 and 64: throughput, p50/p90/p99, the mean formed batch
size (from /metrics), throughput / raw limit at that batch size, and p50 minus the raw
forward at batch 1. wrk runs one thread, so it takes one of the machine's cores."""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NNSERVE = os.path.join(ROOT, "target", "release", "nnserve")
BENCH = os.path.join(ROOT, "target", "release", "nnserve-bench")
EXAMPLES = os.path.join(ROOT, "examples", "repository")


def raw_limit(bundle):
    out = subprocess.run([BENCH, "raw", bundle], capture_output=True, text=True, check=True).stdout
    return {int(b): (float(r), float(p50)) for b, r, p50 in re.findall(r"RAW (\d+) (\d+) ([\d.]+)", out)}


def batch_stats(url, model):
    text = requests.get(f"{url}/metrics").text
    def val(name):
        m = re.search(rf'{name}{{model="{model}",version="1"}} ([\d.e+]+)', text)
        return float(m.group(1)) if m else 0.0
    return val("nnserve_batch_size_sum"), val("nnserve_batch_size_count")


def wrk(url, path, body_file, content_type, conns, seconds):
    env = dict(os.environ, BODY_FILE=body_file, CONTENT_TYPE=content_type)
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
                          "-s", os.path.join(ROOT, "bench", "post.lua"), url + path],
                         capture_output=True, text=True, env=env, check=True).stdout
    n, dur_us, errors, p50, p90, p99 = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)", out).groups()
    return int(n) / (int(dur_us) / 1e6), int(errors), float(p50), float(p90), float(p99)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    tmp = tempfile.mkdtemp()
    repo = os.path.join(tmp, "repo")
    shutil.copytree(os.path.join(EXAMPLES, "mlp"), os.path.join(repo, "mlp"))
    shutil.copytree(os.path.join(EXAMPLES, "digits"), os.path.join(repo, "digits"))
    nb = os.path.join(repo, "mlp-nobatch", "1")
    shutil.copytree(os.path.join(EXAMPLES, "mlp", "1"), nb)
    with open(os.path.join(nb, "bundle.toml")) as f:
        text = f.read()
    text = text.replace('name = "mlp"', 'name = "mlp-nobatch"').split("# Dynamic batching")[0]
    with open(os.path.join(nb, "bundle.toml"), "w") as f:
        f.write(text)
    mlp_body = os.path.join(tmp, "mlp.json")
    with open(mlp_body, "w") as f:
        f.write('{"instances": [[1.0, 2.0, 3.0, 4.0]]}')
    png = os.path.join(tmp, "digit.png")
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "draw_digit.py"), "7", png],
                   check=True, capture_output=True)
    raw = {"mlp": raw_limit(os.path.join(EXAMPLES, "mlp", "1")),
           "digits": raw_limit(os.path.join(EXAMPLES, "digits", "1"))}
    raw["mlp-nobatch"] = raw["mlp"]
    print(f"== {os.cpu_count()} cores; raw limit in-process (1 thread), rows/s (p50 per forward):")
    for m in ("mlp", "digits"):
        print(f"   {m:<7} " + "  ".join(f"b{b}: {r:,.0f} ({p:.1f} us)" for b, (r, p) in sorted(raw[m].items())))
    server = subprocess.Popen([NNSERVE, "serve", "-r", repo, "-l", "127.0.0.1:0", "--log", "warn",
                               "--config", "/dev/null"], stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(http://\S+)", server.stdout.readline()).group(1)
        print(f"{'model':<12}{'c':>4}{'req/s':>10}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}{'errors':>7}"
              f"{'batch':>7}{'of raw':>8}{'+p50 us':>9}")
        for model, path, body, ctype in (("mlp", "/v1/models/mlp:predict", mlp_body, "application/json"),
                                         ("mlp-nobatch", "/v1/models/mlp-nobatch:predict", mlp_body, "application/json"),
                                         ("digits", "/v1/models/digits:infer", png, "image/png")):
            for c in (1, 8, 64):
                s0, n0 = batch_stats(url, model)
                rps, errors, p50, p90, p99 = wrk(url, path, body, ctype, c, args.seconds)
                s1, n1 = batch_stats(url, model)
                batch = (s1 - s0) / (n1 - n0) if n1 > n0 else 1.0
                size = min((b for b in raw[model] if b >= batch), default=64)
                ratio = rps / raw[model][size][0]
                overhead = p50 - raw[model][1][1]
                print(f"{model:<12}{c:>4}{rps:>10,.0f}{p50:>9.1f}{p90:>9.1f}{p99:>9.1f}{errors:>7}"
                      f"{batch:>7.2f}{ratio:>8.3f}{overhead:>9.1f}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
