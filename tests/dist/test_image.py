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


def test_the_image_serves_mlp_from_a_mounted_repository(image, tmp_path):
    tag, info, root = image
    config = info["Config"]
    models = tmp_path / "models"
    shutil.copytree(os.path.join(ROOT, "examples", "repository", "mlp"), models / "mlp",
                    ignore=shutil.ignore_patterns(".meta"))
    for d, _, files in os.walk(tmp_path):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    # The image's command, with the listen address on a free loopback port (no gRPC here).
    cmd = list(config["Cmd"])
    i = cmd.index("--listen")
    cmd[i + 1] = "127.0.0.1:0"
    j = cmd.index("--grpc-listen")
    del cmd[j:j + 2]
    user = config["User"]
    env = {k: v for k, v in (e.split("=", 1) for e in config["Env"])}
    tool = {t: shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") for t in ("unshare", "mount", "chroot")}
    assert all(tool.values()), tool
    mount = tool["mount"]
    script = (f"{mount} -t proc proc {root}/proc && {mount} --rbind /dev {root}/dev && "
              f"{mount} --rbind /sys {root}/sys && {mount} --bind {models} {root}/models && "
              f"exec {tool['chroot']} --userspec={user} {root} " + " ".join(config["Entrypoint"] + cmd))
    started = time.time()
    # The image's environment, as a runtime would give it.
    proc = subprocess.Popen([tool["unshare"], "-m", "--propagation", "private", "/bin/sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "server.log", "w"), text=True,
                            env=env)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, open(tmp_path / "server.log").read()[-3000:]
        print(f"\nimage root filesystem, start to the listening line: {time.time() - started:.2f} s")
        r = requests.post(f"{url}/v1/models/mlp:predict", json={"instances": [[1.0, 2.0, 3.0, 4.0]]}, timeout=30)
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
