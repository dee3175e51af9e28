"""Past one machine: three replicas serving one S3 repository (`--repository s3://...`)
behind a real HAProxy, with a real S3 API server (moto in server mode) on loopback, both
started and stopped here. Uploads, labels and deletes made on one replica reach the
others through the bucket; clients through the load balancer see no failed request while
a new version takes over; a killed replica is routed around and catches up when it comes
back; bad content put straight into the bucket is refused everywhere."""
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import boto3
import numpy as np
import pytest
import requests
from moto.server import ThreadedMotoServer

# moto logs every S3 request through werkzeug; a failing test shows enough without them.
logging.getLogger("werkzeug").setLevel(logging.WARNING)

from conftest import NNSERVE, start_server, stop_server
from test_upload import ROW, expected, mlp_bundle, pack

POLL_MS = 500
# Poll interval plus a load, with room for a 2-core machine running other tests' servers.
CONVERGE_S = 30
BUCKET, PREFIX = "models", "repo"


def free_port():
    """A free loopback port for HAProxy's frontend (its config needs a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what, check, timeout=CONVERGE_S):
    """Polls `check` until it returns a true value; fails naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {got!r}")
        time.sleep(0.05)


def predict(url):
    r = requests.post(f"{url}/v1/models/mlp:predict", json={"instances": ROW}, timeout=10)
    r.raise_for_status()
    return np.array(r.json()["predictions"])


def serves(url, out):
    try:
        return np.allclose(predict(url), out, atol=1e-5)
    except requests.RequestException:
        return False


def status(url):
    r = requests.get(f"{url}/v1/models/mlp", timeout=10)
    return {v["version"]: v for v in r.json()["model_version_status"]} if r.ok else {}


class Cluster:
    def __init__(self, tmp):
        self.tmp = tmp
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = dict(os.environ, AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="test",
                        AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                               aws_secret_access_key="test", region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)
        self.replicas = [None, None, None]
        self.haproxy = None

    def put_dir(self, local, key_prefix):
        """Copies a directory into the bucket as `aws s3 sync` would (no claim, no record)."""
        for dirpath, _, files in os.walk(local):
            for f in files:
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, local).replace(os.sep, "/")
                self.s3.upload_file(path, BUCKET, f"{key_prefix}/{rel}")

    def keys(self, prefix):
        got = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in got.get("Contents", []))

    def cache(self, i):
        return os.path.join(self.tmp, f"cache{i}")

    def start(self, i, listen="127.0.0.1:0"):
        d = os.path.join(self.tmp, f"replica{i}")
        os.makedirs(d, exist_ok=True)
        self.replicas[i] = start_server(f"s3://{BUCKET}/{PREFIX}", d, "--cache-dir", self.cache(i),
                                        "--poll-interval-ms", str(POLL_MS), env=self.env,
                                        listen=listen)
        return self.replicas[i]

    def start_haproxy(self):
        self.lb_port = free_port()
        cfg = os.path.join(self.tmp, "haproxy.cfg")
        servers = "\n".join(
            f"    server r{i} {r.address[0]}:{r.address[1]} check" for i, r in enumerate(self.replicas))
        with open(cfg, "w") as f:
            f.write(f"""global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
    # A request whose replica died before answering goes to another one (inference is
    # idempotent here).
    retry-on conn-failure empty-response response-timeout
    option http-buffer-request
frontend fe
    bind 127.0.0.1:{self.lb_port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1
{servers}
""")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.haproxy_log = open(os.path.join(self.tmp, "haproxy.log"), "w")
        self.haproxy = subprocess.Popen([haproxy, "-db", "-f", cfg], stdout=self.haproxy_log,
                                        stderr=subprocess.STDOUT)
        self.lb = f"http://127.0.0.1:{self.lb_port}"
        until("HAProxy to answer", lambda: self.haproxy.poll() is None and serves_any(self.lb))

    def stop(self):
        if self.haproxy is not None:
            self.haproxy.send_signal(signal.SIGTERM)
            try:
                self.haproxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
        for r in self.replicas:
            if r is not None and r.proc.poll() is None:
                stop_server(r)
        self.moto.stop()


def serves_any(url):
    try:
        return requests.post(f"{url}/v1/models/mlp:predict", json={"instances": ROW}, timeout=5).ok
    except requests.RequestException:
        return False


class Clients:
    """`n` clients calling through the load balancer until stopped (bounded: 60 s)."""

    def __init__(self, url, n=4):
        self.url, self.stop_at = url, time.time() + 60
        self.done = threading.Event()
        self.answers, self.failures = [], []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(n)]
        for t in self.threads:
            t.start()

    def run(self):
        s = requests.Session()
        while not self.done.is_set() and time.time() < self.stop_at:
            try:
                r = s.post(f"{self.url}/v1/models/mlp:predict", json={"instances": ROW}, timeout=10)
                with self.lock:
                    if r.ok:
                        self.answers.append(np.array(r.json()["predictions"]))
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
            except requests.RequestException as e:
                with self.lock:
                    self.failures.append(repr(e)[:200])

    def count(self):
        with self.lock:
            return len(self.answers)

    def finish(self):
        self.done.set()
        for t in self.threads:
            t.join()
        return self.answers, self.failures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("objects"))
    c = Cluster(tmp)
    c.v1_dir = mlp_bundle(tmp, 1, seed=0)
    c.v1 = expected(c.v1_dir)
    # v1 copied in by hand (as `aws s3 sync` would): every replica takes it at start.
    c.put_dir(c.v1_dir, f"{PREFIX}/mlp/1")
    try:
        for i in range(3):
            c.start(i)
        c.start_haproxy()
        yield c
    finally:
        c.stop()


def test_every_replica_starts_from_the_bucket_and_reports_its_health(cluster):
    for r in cluster.replicas:
        assert np.allclose(predict(r.url), cluster.v1, atol=1e-5)
        body = requests.get(f"{r.url}/v1/models").json()
        repo = body["repository"]
        assert repo["url"] is None, "the bucket's name is for the admin only"
        assert repo["healthy"] is True and repo["last_sync"] > 0, repo
        metrics = requests.get(f"{r.url}/metrics").text
        assert "nnserve_repository_sync_errors_total 0" in metrics
        assert "nnserve_repository_last_sync_timestamp_seconds " in metrics
    # Each replica has its own locked cache; a second process cannot take one.
    d = os.path.join(cluster.tmp, "intruder")
    os.makedirs(d)
    proc = subprocess.run(
        [NNSERVE, "serve", "--repository", f"s3://{BUCKET}/{PREFIX}",
         "--cache-dir", cluster.cache(0), "--listen", "127.0.0.1:0"],
        env=cluster.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "another nnserve uses the cache" in proc.stderr, proc.stderr[-500:]


def test_an_upload_to_one_replica_reaches_all_and_clients_see_no_failure(cluster):
    v2_dir = mlp_bundle(cluster.tmp, 2, seed=1)
    cluster.v2 = v2 = expected(v2_dir)
    assert not np.allclose(cluster.v1, v2)
    archive = pack(v2_dir, os.path.join(cluster.tmp, "mlp-2.tar.gz"))
    clients = Clients(cluster.lb)
    until("the clients' first answers", lambda: clients.count() >= 20)
    r0, others = cluster.replicas[0], cluster.replicas[1:]
    r = requests.post(f"{r0.url}/v1/models/mlp/versions", data=archive,
                      headers={"Content-Type": "application/gzip"}, timeout=60)
    created = time.time()
    assert r.status_code == 201, r.text
    # The receiving replica serves it at once, the others within a poll and a load.
    assert np.allclose(predict(r0.url), v2, atol=1e-5)
    for other in others:
        until(f"{other.url} to serve v2", lambda: serves(other.url, v2))
    took = time.time() - created
    print(f"\nupload 201 -> last replica serving v2: {took:.2f} s (poll interval {POLL_MS} ms)")
    # Clients keep going a little after the swap, then only v2 answers.
    seen = clients.count()
    until("answers after the swap", lambda: clients.count() >= seen + 40)
    answers, failures = clients.finish()
    assert failures == [], failures[:5]
    assert len(answers) > 60
    for _ in range(12):
        assert np.allclose(predict(cluster.lb), v2, atol=1e-5)
    for rep in cluster.replicas:
        st = status(rep.url)
        assert st["2"]["state"] == "AVAILABLE", st
        until(f"v1 to retire on {rep.url}", lambda: status(rep.url)["1"]["state"] == "END")
    # The bucket holds v2 with its claim and record, written by the upload.
    keys = cluster.keys(f"{PREFIX}/mlp/")
    assert f"{PREFIX}/mlp/.meta/2.json" in keys and f"{PREFIX}/mlp/.meta/2.claim" in keys, keys
    # Uploading v2 again with other content through another replica: 409 from the bucket.
    other = pack(mlp_bundle(cluster.tmp, 2, seed=7), os.path.join(cluster.tmp, "mlp-2b.tar.gz"))
    r = requests.post(f"{cluster.replicas[1].url}/v1/models/mlp/versions", data=other,
                      headers={"Content-Type": "application/gzip"}, timeout=60)
    assert r.status_code == 409, r.text
    assert np.allclose(predict(cluster.lb), v2, atol=1e-5)


def test_a_label_and_a_delete_on_one_replica_reach_the_others(cluster):
    r1, r2 = cluster.replicas[1], cluster.replicas[2]
    r = requests.put(f"{r1.url}/v1/models/mlp/labels/stable", json={"version": 1, "force": True},
                     timeout=30)
    assert r.status_code == 200, r.text
    for rep in cluster.replicas:
        until(f"the label on {rep.url}",
              lambda: requests.get(f"{rep.url}/v1/models/mlp/labels/stable").ok)
        # The labelled version serves again on every replica.
        until(f"v1 by label on {rep.url}", lambda: np.allclose(np.array(requests.post(
            f"{rep.url}/v1/models/mlp/labels/stable:predict", json={"instances": ROW}).json().get(
                "predictions", [[0, 0, 0]])), cluster.v1, atol=1e-5))
    # A labelled version cannot be deleted, from any replica.
    r = requests.delete(f"{r2.url}/v1/models/mlp/versions/1", timeout=30)
    assert r.status_code == 409, r.text
    r = requests.put(f"{r2.url}/v1/models/mlp/labels/stable", json={"version": 2}, timeout=30)
    assert r.status_code == 200, r.text
    for rep in cluster.replicas:
        until(f"the label moved on {rep.url}", lambda: np.allclose(np.array(requests.post(
            f"{rep.url}/v1/models/mlp/labels/stable:predict", json={"instances": ROW}).json().get(
                "predictions", [[0, 0, 0]])), cluster.v2, atol=1e-5))
    r = requests.delete(f"{r2.url}/v1/models/mlp/versions/1", timeout=30)
    assert r.status_code == 200, r.text
    assert cluster.keys(f"{PREFIX}/mlp/1/") == []
    for i in range(3):
        until(f"v1 to leave cache {i}", lambda: not os.path.exists(os.path.join(cluster.cache(i), "mlp", "1")))
    assert requests.delete(f"{cluster.replicas[0].url}/v1/models/mlp/versions/1").status_code == 404
    assert np.allclose(predict(cluster.lb), cluster.v2, atol=1e-5)


def test_bad_content_put_into_the_bucket_is_refused_everywhere_and_v2_keeps_serving(cluster):
    # v3: copied in by hand with weights that are not a TorchScript file.
    bad = os.path.join(cluster.tmp, "bad3")
    shutil.copytree(mlp_bundle(cluster.tmp, 3, seed=3), bad)
    with open(os.path.join(bad, "model", "model.pt"), "wb") as f:
        f.write(b"this is not a model" * 100)
    cluster.put_dir(bad, f"{PREFIX}/mlp/3")
    # v4: files, claim and a record whose digest the files do not have.
    good4 = mlp_bundle(cluster.tmp, 4, seed=4)
    cluster.put_dir(good4, f"{PREFIX}/mlp/4")
    cluster.s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/mlp/.meta/4.claim", Body=b"{}")
    cluster.s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/mlp/.meta/4.json",
                          Body=b'{"digest": "sha256:00", "size": 1, "uploaded_at": 1}')
    for rep in cluster.replicas:
        def refused():
            st = status(rep.url)
            errors = {v: st.get(v, {}).get("status", {}).get("error_message") for v in ("3", "4")}
            return st if all(errors.values()) else None

        st = until(f"v3 and v4 refused on {rep.url}", refused)
        assert st["3"]["state"] == "END" and st["4"]["state"] == "END", st
        assert "TorchScript" in st["3"]["status"]["error_message"], st["3"]
        assert "do not match its record" in st["4"]["status"]["error_message"], st["4"]
        assert st["2"]["state"] == "AVAILABLE", st
        assert np.allclose(predict(rep.url), cluster.v2, atol=1e-5)
    assert not os.path.exists(os.path.join(cluster.cache(0), "mlp", "4"))
    # v3 copied again, fixed: every replica loads it, as a fixed directory on disk is.
    v3 = expected(mlp_bundle(cluster.tmp, 3, seed=3))
    cluster.put_dir(mlp_bundle(cluster.tmp, 3, seed=3), f"{PREFIX}/mlp/3")
    for rep in cluster.replicas:
        until(f"the fixed v3 on {rep.url}", lambda: status(rep.url).get("3", {}).get("state") == "AVAILABLE")
        assert np.allclose(predict(rep.url), v3, atol=1e-5)


def test_a_killed_replica_is_routed_around_and_catches_up_from_the_bucket(cluster):
    clients = Clients(cluster.lb)
    until("the clients' first answers", lambda: clients.count() >= 20)
    victim = cluster.replicas[2]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed = clients.count()
    until("answers after the kill", lambda: clients.count() >= killed + 100)
    # While it is down, v5 is uploaded to another replica.
    v5_dir = mlp_bundle(cluster.tmp, 5, seed=5)
    v5 = expected(v5_dir)
    archive = pack(v5_dir, os.path.join(cluster.tmp, "mlp-5.tar.gz"))
    r = requests.post(f"{cluster.replicas[0].url}/v1/models/mlp/versions", data=archive,
                      headers={"Content-Type": "application/gzip"}, timeout=60)
    assert r.status_code == 201, r.text
    answers, failures = clients.finish()
    # HAProxy retries a request whose replica died (retry-on): none fails.
    assert failures == [], failures[:5]
    # Restarted on its cache and its address: the valid versions are reused, v5 comes
    # from the bucket, and HAProxy's health check takes it back.
    host, port = victim.address
    restarted = cluster.start(2, listen=f"{host}:{port}")
    log = re.sub(r"\x1b\[[0-9;]*m", "", restarted.log())
    m = re.search(r"synced the object store into the cache.*cached=(\d+) downloaded=(\d+)", log)
    assert m, log[-2000:]
    assert int(m.group(1)) >= 1 and int(m.group(2)) == 1, m.group(0)  # only v5 was fetched
    assert np.allclose(predict(restarted.url), v5, atol=1e-5)
    for rep in cluster.replicas:
        until(f"v5 on {rep.url}", lambda: serves(rep.url, v5))

    def served_by_restarted():
        text = requests.get(f"{restarted.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("nnserve_requests_total{") and 'outcome="ok"' in line)

    before = served_by_restarted()
    until("HAProxy to send requests to the restarted replica",
          lambda: serves(cluster.lb, v5) and served_by_restarted() > before)


def test_an_unreachable_bucket_leaves_the_replica_serving_its_cache(tmp_path):
    """The bucket goes away while a replica serves, and is still away when it restarts:
    it serves from its cache all along, says so, reports the source unhealthy, and
    recovers once the bucket is back (moto's data lives in this process, so a server on
    the same port brings the same bucket back)."""
    tmp = str(tmp_path)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
               AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    s3.create_bucket(Bucket="offline")
    v1_dir = mlp_bundle(tmp, 1, seed=0)
    v1 = expected(v1_dir)
    for name in ("bundle.toml", "model/model.pt"):
        s3.upload_file(os.path.join(v1_dir, name), "offline", f"r/mlp/1/{name}")
    cache = os.path.join(tmp, "cache")
    args = ("--cache-dir", cache, "--poll-interval-ms", "200")
    server = start_server("s3://offline/r", tmp, *args, env=env)
    try:
        assert np.allclose(predict(server.url), v1, atol=1e-5)
        moto.stop()
        repo = until("the source to be reported unhealthy", lambda: (lambda r: r if not r["healthy"] else None)(
            requests.get(f"{server.url}/v1/models").json()["repository"]))
        assert repo["sync_errors"] > 0 and repo["last_sync"] > 0, repo
        assert np.allclose(predict(server.url), v1, atol=1e-5)
        stop_server(server)
        # Restarted while the bucket is away: it starts, from its cache, and says so.
        server = start_server("s3://offline/r", tmp, *args, env=env)
        log = re.sub(r"\x1b\[[0-9;]*m", "", server.log())
        assert "cannot be reached" in log and "serving the 1 versions the cache holds" in log, log[-1500:]
        assert np.allclose(predict(server.url), v1, atol=1e-5)
        metrics = requests.get(f"{server.url}/metrics").text
        errors = [line for line in metrics.splitlines() if line.startswith("nnserve_repository_sync_errors_total ")]
        assert errors and float(errors[0].split()[1]) > 0, errors
        # Back: the next poll (after its backoff) syncs and the source is healthy again.
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
        until("the source to be healthy again",
              lambda: requests.get(f"{server.url}/v1/models").json()["repository"]["healthy"])
        assert np.allclose(predict(server.url), v1, atol=1e-5)
    finally:
        stop_server(server)
        moto.stop()
