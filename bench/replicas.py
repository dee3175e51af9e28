"""Replicas on one S3 repository (docs/object-store.md), measured with real parts: moto's
S3 server on loopback, nnserve replicas, HAProxy and wrk.

    .venv/bin/python bench/replicas.py [--seconds 10]

Prints:
1. the time from an upload's 201 (to one replica) to the last of three replicas serving
   the new version, at poll intervals of 500 and 2000 ms (5 uploads each);
2. object-store requests per replica per poll when nothing changes;
3. cold start (process start to the listening line) of a replica with an empty cache
   and with a warm one, for the example repository and for a ~200 MB TorchScript model;
4. mlp throughput through HAProxy to 3 replicas beside 1 replica called directly (wrk,
   c=8 and 64, alternating), on whatever cores this machine has.
"""
import argparse
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import boto3
import numpy as np
import requests
import torch
from moto.server import ThreadedMotoServer

sys.path.insert(0, os.path.dirname(__file__))
import load  # noqa: E402
from load_effect import big_bundle  # noqa: E402

sys.path.insert(0, os.path.join(load.ROOT, "examples"))
import make_models  # noqa: E402

ROW = [[1.0, 2.0, 3.0, 4.0]]


class MotoCount(logging.Handler):
    """Counts the requests moto's werkzeug server answers."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def emit(self, record):
        if "HTTP/1.1" in record.getMessage():
            self.n += 1


def start_replica(url, cache, env, poll_ms):
    started = time.time()
    p = subprocess.Popen([load.NNSERVE, "serve", "-r", url, "-l", "127.0.0.1:0", "--cache-dir", cache,
                          "--poll-interval-ms", str(poll_ms)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return p, m.group(1), time.time() - started
    raise SystemExit("a replica did not start")


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)


def put_dir(s3, local, prefix):
    for dirpath, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if d != ".tmp"]
        for f in files:
            path = os.path.join(dirpath, f)
            s3.upload_file(path, "bench", f"{prefix}/{os.path.relpath(path, local)}")


def mlp_archive(tmp, version):
    d = os.path.join(tmp, f"mlp-{version}")
    make_models.make_mlp(d, seed=version, version=version, name="mlp")
    bundle = os.path.join(d, "mlp", str(version))
    with open(os.path.join(load.EXAMPLES, "mlp", "1", "bundle.toml")) as f:
        text = f.read().replace("version = 1", f"version = {version}")
    with open(os.path.join(bundle, "bundle.toml"), "w") as f:
        f.write(text)
    out = os.path.join(tmp, f"mlp-{version}.tar.gz")
    subprocess.run([load.NNSERVE, "bundle", "pack", bundle, "-o", out], check=True, capture_output=True)
    model = torch.jit.load(os.path.join(bundle, "model", "model.pt")).eval()
    return open(out, "rb").read(), model(torch.tensor(ROW)).detach().numpy()


def serves(url, out):
    try:
        r = requests.post(f"{url}/v1/models/mlp:predict", json={"instances": ROW}, timeout=10)
        return r.ok and np.allclose(np.array(r.json()["predictions"]), out, atol=1e-5)
    except requests.RequestException:
        return False


def haproxy(tmp, urls):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    servers = "\n".join(f"    server r{i} {u.split('://')[1]} check" for i, u in enumerate(urls))
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn 1024
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    default-server inter 1s
{servers}
""")
    p = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", cfg],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while not serves_any(url):
        if time.time() > deadline:
            raise SystemExit("haproxy did not answer")
        time.sleep(0.1)
    return p, url


def serves_any(url):
    try:
        return requests.post(f"{url}/v1/models/mlp:predict", json={"instances": ROW}, timeout=5).ok
    except requests.RequestException:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="seconds per wrk run")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    count = MotoCount()
    logging.getLogger("werkzeug").addHandler(count)
    logging.getLogger("werkzeug").propagate = False
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="b",
               AWS_SECRET_ACCESS_KEY="b", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="b",
                      aws_secret_access_key="b", region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    tmp = tempfile.mkdtemp(prefix="replicas-", dir=load.WORK if os.path.isdir(load.WORK) else None)
    procs = []
    try:
        put_dir(s3, load.EXAMPLES, "examples")
        print(f"== moto S3 at {env['AWS_ENDPOINT_URL']}; nnserve {load.NNSERVE}", flush=True)

        # 3. Cold starts: empty cache, then warm.
        big = os.path.join(tmp, "big-src")
        big_bundle(big)
        put_dir(s3, big, "big/big/1")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(big) for f in fs)
        print(f"\n-- cold start to the listening line (median of 3); big = {size / 1e6:.0f} MB")
        for name in ("examples", "big"):
            empty, warm = [], []
            for i in range(3):
                cache = os.path.join(tmp, f"start-{name}-{i}")
                p, _, took = start_replica(f"s3://bench/{name}", cache, env, 2000)
                stop(p)
                empty.append(took)
                p, _, took = start_replica(f"s3://bench/{name}", cache, env, 2000)
                stop(p)
                warm.append(took)
            print(f"{name:<10} empty cache {statistics.median(empty):6.2f} s   warm cache "
                  f"{statistics.median(warm):6.2f} s", flush=True)

        # 1. Upload to one replica -> every replica serves it.
        version = 100
        for poll_ms in (500, 2000):
            reps = [start_replica("s3://bench/examples", os.path.join(tmp, f"c{poll_ms}-{i}"), env, poll_ms)
                    for i in range(3)]
            procs = [r[0] for r in reps]
            urls = [r[1] for r in reps]
            took = []
            for _ in range(5):
                version += 1
                body, out = mlp_archive(tmp, version)
                r = requests.post(f"{urls[0]}/v1/models/mlp/versions", data=body,
                                  headers={"Content-Type": "application/gzip"}, timeout=60)
                t201 = time.time()
                assert r.status_code == 201, r.text
                pending = set(urls)
                while pending:
                    pending = {u for u in pending if not serves(u, out)}
                    time.sleep(0.01)
                took.append(time.time() - t201)
            print(f"\n-- poll {poll_ms} ms: upload 201 -> last of 3 replicas serving: median "
                  f"{statistics.median(took):.2f} s, max {max(took):.2f} s ({', '.join(f'{t:.2f}' for t in took)})")
            if poll_ms == 500:
                # 2. Requests per idle poll.
                time.sleep(2)
                n0, t0 = count.n, time.time()
                time.sleep(10)
                polls = 3 * (time.time() - t0) / (poll_ms / 1000)
                print(f"-- idle: {count.n - n0} object-store requests in 10 s from 3 replicas "
                      f"polling every {poll_ms} ms = {(count.n - n0) / polls:.2f} per replica per poll")
                # 4. Throughput: HAProxy -> 3 replicas vs 1 replica directly.
                lb, lb_url = haproxy(tmp, urls)
                procs.append(lb)
                body_file = os.path.join(tmp, "row.json")
                with open(body_file, "w") as f:
                    f.write('{"instances": [[1.0, 2.0, 3.0, 4.0]]}')
                print(f"\n-- mlp throughput, wrk -t1, {args.seconds} s per run, alternating "
                      f"({os.cpu_count()} cores shared by wrk, HAProxy and the replicas)")
                print(f"{'target':<22}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
                for c in (8, 64):
                    for _ in range(2):
                        for label, url in (("1 replica direct", urls[0]), ("HAProxy -> 3", lb_url)):
                            load.wait_quiet()
                            rps, errors, p50, _, p99, _ = load.wrk(url, "/v1/models/mlp:predict", body_file,
                                                                  "application/json", c, args.seconds)
                            print(f"{label:<22}{c:>4}{rps:>10,.0f}{p50 / 1000:>9.2f}{p99 / 1000:>9.2f}"
                                  f"{errors:>8}", flush=True)
            for p in procs:
                stop(p)
            procs = []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
