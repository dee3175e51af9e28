"""The release tarball (`make dist`, scripts/dist.sh) works away from the build: unpacked
into an empty directory, every library resolves inside it or in the base system, no
RUNPATH names the build, libtorch's CUDA half is not linked, and the example repository
is served from it with the dynamic loader proving that nothing of the checkout (its
.venv included) is opened."""
import glob
import os
import re
import subprocess
import tarfile
import time

import pytest
import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SYSTEM = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    tarballs = sorted(glob.glob(os.path.join(ROOT, "dist", "nnserve-*-linux-x86_64.tar.gz")))
    if not tarballs:
        pytest.fail("no dist/nnserve-*-linux-x86_64.tar.gz: run `make dist` (make test does)")
    tarball = tarballs[-1]
    where = str(tmp_path_factory.mktemp("unpacked"))
    started = time.time()
    with tarfile.open(tarball) as t:
        t.extractall(where, filter="data")
    [top] = os.listdir(where)
    print(f"\n{os.path.basename(tarball)}: {os.path.getsize(tarball) / 1e6:.0f} MB, "
          f"unpacked in {time.time() - started:.1f} s")
    return os.path.join(where, top)


def elf_files(top):
    files = [os.path.join(top, "bin", "nnserve")]
    for path in glob.glob(os.path.join(top, "lib", "**", "*.so*"), recursive=True):
        if os.path.isfile(path) and not os.path.islink(path):
            files.append(path)
    return files


def test_every_library_resolves_inside_the_tarball_or_the_base_system(unpacked):
    shipped = elf_files(unpacked)
    assert any(os.path.basename(f).startswith("libtorch_cpu") for f in shipped), shipped
    for f in shipped:
        out = subprocess.run(["ldd", f], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, (f, out.stderr)
        assert "not found" not in out.stdout, (f, out.stdout)
        for soname, path in re.findall(r"^\s*(\S+) => (/\S+)", out.stdout, re.M):
            assert path.startswith(unpacked) or path.startswith(SYSTEM), (f, soname, path)


def test_no_runpath_names_the_build_and_cuda_is_not_linked(unpacked):
    for f in elf_files(unpacked):
        rpath = subprocess.run(["patchelf", "--print-rpath", f], capture_output=True, text=True,
                               check=True).stdout.strip()
        assert ROOT not in rpath and ".venv" not in rpath, (f, rpath)
        assert all(p.startswith("$ORIGIN") for p in rpath.split(":") if p), (f, rpath)
    needed = subprocess.run(["patchelf", "--print-needed", os.path.join(unpacked, "bin", "nnserve")],
                            capture_output=True, text=True, check=True).stdout.split()
    assert "libtorch_cuda.so" not in needed, needed
    assert not glob.glob(os.path.join(unpacked, "lib", "libtorch_cuda*")), "the CPU tarball has no CUDA half"


def test_the_examples_are_served_from_the_tarball_with_the_build_out_of_reach(unpacked, tmp_path):
    repo = os.path.join(unpacked, "share", "nnserve", "examples", "repository")
    trace = str(tmp_path / "ld")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           # The loader writes every library it looks for and opens (dlopen included).
           "LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": trace}
    started = time.time()
    proc = subprocess.Popen([os.path.join(unpacked, "bin", "nnserve"), "serve", "-r", repo,
                             "-l", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "server.log", "w"), text=True, env=env, cwd=str(tmp_path))
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, open(tmp_path / "server.log").read()[-3000:]
        print(f"\ncold start from the tarball to the listening line: {time.time() - started:.2f} s")
        row = {"instances": [[1.0, 2.0, 3.0, 4.0]]}
        for model in ("mlp", "tf-mlp"):
            r = requests.post(f"{url}/v1/models/{model}:predict", json=row, timeout=30)
            assert r.status_code == 200, (model, r.text)
            assert len(r.json()["predictions"][0]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = []
    for f in glob.glob(trace + ".*"):
        lines += open(f).read().splitlines()
    assert any("libtensorflow" in line for line in lines), "TensorFlow was opened from the tarball"
    reached = [line for line in lines if ROOT in line or ".venv" in line]
    assert reached == [], reached[:10]
    opened = {m for line in lines for m in re.findall(r"calling init: (\S+)", line)}
    outside = [p for p in opened if not p.startswith(unpacked) and not p.startswith(SYSTEM)]
    assert outside == [], outside
