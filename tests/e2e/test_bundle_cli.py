"""A user packs and inspects bundles with the CLI: packing is deterministic, the digest
is the same from the directory and from the archive, and a bundle with a plugin that
imports sockets is refused before anything is written."""
import os
import re
import shutil
import subprocess

from conftest import EXAMPLES, NNSERVE, WASM, plugin_bundle


def nnserve(*args):
    return subprocess.run([NNSERVE, *args], capture_output=True, text=True)


def test_pack_is_deterministic_and_inspect_shows_the_same_digest(tmp_path):
    digits = os.path.join(EXAMPLES, "digits", "1")
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    first = nnserve("bundle", "pack", digits, "-o", str(a))
    assert first.returncode == 0, first.stderr
    assert nnserve("bundle", "pack", digits, "-o", str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    digest = re.search(r"digest (sha256:[0-9a-f]{64})", first.stdout).group(1)

    for target in (str(a), digits):
        shown = nnserve("bundle", "inspect", target)
        assert shown.returncode == 0, shown.stderr
        assert f"digest   {digest}" in shown.stdout
        assert "bundle   digits@1" in shown.stdout
        assert "input  input fp32 [-1, 1, 8, 8]" in shown.stdout
        assert "imports wasi:nn/graph@0.2.0-rc-2024-10-28" in shown.stdout
        assert "assets/labels.txt" in shown.stdout


def test_plugins_built_here_start_with_4_mib_of_linear_memory():
    """.cargo/config.toml links every plugin with --initial-memory=4194304, so a request's
    allocations do not grow memory and the next instantiation pays no mprotect; inspect
    shows it, and would point at docs/plugins.md for a smaller start."""
    for bundle, world in (("digits", "handler "), ("mlp-ab", "router  ")):
        shown = nnserve("bundle", "inspect", os.path.join(EXAMPLES, bundle, "1"))
        assert shown.returncode == 0, shown.stderr
        plugin = shown.stdout.split(world, 1)[1]
        assert "  initial memory 4096 KiB\n" in plugin, shown.stdout


def test_pack_refuses_a_plugin_that_imports_sockets(tmp_path):
    repo = str(tmp_path / "repo")
    plugin_bundle(repo, "forbidden", "forbidden_import.wasm")
    out = tmp_path / "f.tar.gz"
    r = nnserve("bundle", "pack", os.path.join(repo, "forbidden", "1"), "-o", str(out))
    assert r.returncode != 0
    assert "wasi:sockets/tcp" in r.stderr and "does not grant" in r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_inspect_reports_an_unsafe_archive(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    subprocess.run(["tar", "-czf", str(evil), "-P", "--transform", "s,^,../,", "-C", EXAMPLES, "mlp/1/bundle.toml"],
                   check=True)
    r = nnserve("bundle", "inspect", str(evil))
    assert r.returncode != 0 and "climbs out of the bundle" in r.stderr
