"""The container image (`make image`) serves mlp from a mounted repository.

Containers cannot run on this kind of machine: `podman run` fails with "crun: cgroups in
hybrid mode not supported, drop all controllers from cgroupv2" (and, before that, with
setrlimit errors unless the ulimits are lowered). So the test runs the image's own root
filesystem (`podman image mount`) the way a runtime would: a private mount namespace
with /proc, /dev and /sys, the repository bind-mounted on /models, `chroot` as the
image's user, and the image's entrypoint with its command's flags (the listen address
moved to a free loopback port)."""
import json
import os
import re
import shutil
import subprocess
import time

import pytest
import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def version():
    out = subprocess.run(["cargo", "pkgid", "-p", "nnserve"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    return re.split(r"[@#]", out)[-1]


@pytest.fixture(scope="module")
def image():
    tag = f"nnserve:{version()}"
    out = subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"no image {tag}: run `make image` (make test does): {out.stderr[-300:]}")
    [info] = json.loads(out.stdout)
    mount = subprocess.run(["podman", "image", "mount", tag], capture_output=True, text=True, check=True)
    yield tag, info, mount.stdout.strip()
    subprocess.run(["podman", "image", "unmount", tag], capture_output=True)


def test_the_image_is_built_from_scratch_for_a_non_root_user(image):
    tag, info, root = image
    config = info["Config"]
    assert config["User"] == "65532:65532", config
    assert config["Entrypoint"] == ["/opt/nnserve/bin/nnserve", "serve"], config
    assert "--management" in config["Cmd"] and "/models" in config["Cmd"], config
    assert len(info["RootFS"]["Layers"]) == 1, "FROM scratch and one COPY"
    # Only what the release and its base-system libraries need: no shell, no package manager.
    assert not os.path.exists(os.path.join(root, "bin", "sh"))
    assert not os.path.exists(os.path.join(root, "usr", "bin", "apt"))
    print(f"\n{tag}: {info['Size'] / 1e6:.0f} MB")


def start_image(image, tmp_path, cmd, env=(), binds=()):
    """Runs the image's entrypoint with `cmd` over its own files, as a runtime would;
    `binds`: (host directory, path in the image). The process and its URL."""
    tag, info, root = image
    config = info["Config"]
    tool = {t: shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") for t in ("unshare", "mount", "chroot")}
    assert all(tool.values()), tool
    mount = tool["mount"]
    script = (f"{mount} -t proc proc {root}/proc && {mount} --rbind /dev {root}/dev && "
              f"{mount} --rbind /sys {root}/sys && "
              + "".join(f"{mount} --bind {host} {root}{inside} && " for host, inside in binds)
              + f"exec {tool['chroot']} --userspec={config['User']} {root} "
              + " ".join(config["Entrypoint"] + cmd))
    # The image's environment, as a runtime would give it, and the caller's.
    environ = dict(e.split("=", 1) for e in config["Env"])
    environ.update(env)
    log = tmp_path / "server.log"
    proc = subprocess.Popen([tool["unshare"], "-m", "--propagation", "private", "/bin/sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=environ)
    url = None
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        pytest.fail(f"the image did not start: {open(log).read()[-3000:]}")
    return proc, url


def readable(path):
    for d, _, files in os.walk(path):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


ROW = {"instances": [[1.0, 2.0, 3.0, 4.0]]}


def test_the_image_serves_mlp_from_a_mounted_repository(image, tmp_path):
    config = image[1]["Config"]
    models = tmp_path / "models"
    shutil.copytree(os.path.join(ROOT, "examples", "repository", "mlp"), models / "mlp",
                    ignore=shutil.ignore_patterns(".meta"))
    readable(tmp_path)
    # The image's command, with the listen address on a free loopback port (no gRPC here).
    cmd = list(config["Cmd"])
    cmd[cmd.index("--listen") + 1] = "127.0.0.1:0"
    j = cmd.index("--grpc-listen")
    del cmd[j:j + 2]
    started = time.time()
    proc, url = start_image(image, tmp_path, cmd, binds=[(models, "/models")])
    try:
        print(f"\nimage root filesystem, start to the listening line: {time.time() - started:.2f} s")
        r = requests.post(f"{url}/v1/models/mlp:predict", json=ROW, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"][0]) == 3
        # The management routes are off, as the image's command says.
        assert requests.delete(f"{url}/v1/models/mlp/versions/1").status_code in (404, 405)
        # It runs as the image's user (unshare, sh and chroot each exec the next: one pid).
        uid = open(f"/proc/{proc.pid}/status").read().split("Uid:")[1].split()[0]
        assert uid == "65532", uid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_image_serves_from_the_object_store(image, tmp_path):
    """The image's other source: an s3:// repository (moto on loopback), its cache in the
    user's home (a volume here, as it would be in a deployment)."""
    import boto3
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="t", aws_secret_access_key="t",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="images")
        mlp = os.path.join(ROOT, "examples", "repository", "mlp", "1")
        for name in ("bundle.toml", "model/model.pt"):
            s3.upload_file(os.path.join(mlp, name), "images", f"repo/mlp/1/{name}")
        home = tmp_path / "home"
        home.mkdir()
        os.chown(home, 65532, 65532)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
        proc, url = start_image(image, tmp_path, ["--repository", "s3://images/repo", "--listen", "127.0.0.1:0",
                                                  "--management", "off"], env=env,
                                binds=[(home, "/home/nnserve")])
        try:
            r = requests.post(f"{url}/v1/models/mlp:predict", json=ROW, timeout=30)
            assert r.status_code == 200, r.text
            # The cache went to the default place, the user's home.
            assert any((home / ".cache" / "nnserve").iterdir())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        moto.stop()
