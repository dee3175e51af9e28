"""docs/plugins.md's tutorial, run as it is written: every `sh` block of its "Tutorial"
section in order (the block that starts a server aside: the test starts its own), with
`nnserve` on PATH, and every output the doc shows (`# {...}` lines without `...`)
expected in what the commands print. So the doc cannot rot."""
import os
import re
import subprocess
import time

from conftest import NNSERVE, start_server, stop_server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "plugins.md")


def tutorial_blocks():
    with open(DOC) as f:
        text = f.read()
    section = text.split("## Tutorial", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_the_plugin_tutorial_runs_as_written(tmp_path):
    blocks = tutorial_blocks()
    assert len(blocks) >= 4, "the tutorial's steps are sh blocks"
    run = [b for b in blocks if "nnserve serve" not in b]
    assert len(run) == len(blocks) - 1, "exactly one block starts the server"
    shown = [line[2:].strip() for b in run for line in b.splitlines()
             if line.startswith("# {") and "..." not in line]
    assert shown, "the tutorial shows answers"
    repo = tmp_path / "models"
    os.makedirs(repo)
    s = start_server(str(repo), str(tmp_path))
    # The scaffolded crate's cargo build reuses the workspace's compiled dependencies
    # (its target/ and lockfile), as a warm machine would; the commands are the doc's.
    prelude = f"""set -euo pipefail
export PATH={os.path.dirname(NNSERVE)}:$PATH
cargo() {{
  if [ -f Cargo.toml ] && [ ! -e target ]; then
    ln -s {ROOT}/target target && cp {ROOT}/Cargo.lock Cargo.lock
  fi
  command cargo "$@"
}}
"""
    script = prelude + "\n".join(b.replace("http://127.0.0.1:8080", s.url) for b in run)
    work = tmp_path / "work"
    os.makedirs(work)
    try:
        started = time.monotonic()
        out = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=900)
        took = time.monotonic() - started
    finally:
        stop_server(s)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    for answer in shown:
        assert answer in out.stdout, (answer, out.stdout)
    assert '"error"' in out.stdout.splitlines()[-1], "the bad body's answer"
    assert "greeting you" in out.stderr, "bundle run shows the plugin's log"
    print(f"\nthe tutorial, plugin new to its last answer: {took:.1f} s")
