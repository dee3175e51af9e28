"""What a plugin author sees when a plugin misbehaves or talks: a panic's message in the
500 and in the log, println!/eprintln! in the debug log, a model input the plugin built
wrongly blamed on the plugin, and typed config with lists and tables (the test plugin
`misbehave`, tests/plugins/misbehave)."""
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tomllib
import time

import requests

from conftest import EXAMPLES, MLP_MODEL, NNSERVE, WASM, plugin_bundle, start_server, stop_server


def one_plugin(tmp_path, name, config, *args):
    repo = os.path.join(str(tmp_path), "repo")
    plugin_bundle(repo, name, "misbehave.wasm", config)
    return start_server(repo, str(tmp_path), *args)


def test_a_panic_reaches_the_client_shortened_and_the_log_whole(tmp_path):
    s = one_plugin(tmp_path, "panicky", 'mode = "panic"')
    try:
        r = requests.post(f"{s.url}/v1/models/panicky:infer", data=b"x", timeout=30)
        assert requests.post(f"{s.url}/v1/models/panicky:infer", data=b"again", timeout=30).status_code == 500
    finally:
        stop_server(s)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert "plugin panicky@1 (plugins/handler.wasm) panicked: misbehave panicked on purpose: yyy" in error, error
    assert len(error) < 400, "shortened"
    assert "second line" not in error and "lib.rs" not in error, "no location, first line only"
    log = s.log()
    assert "plugin panicked" in log and "its second line" in log, log[-2000:]
    assert "src/lib.rs:" in log, "the log has the location"


def test_println_and_eprintln_reach_the_debug_log_escaped(tmp_path):
    s = one_plugin(tmp_path, "printer", 'mode = "print"', "--log", "info,nnserve::plugin=debug")
    try:
        r = requests.post(f"{s.url}/v1/models/printer:infer", data=b"ok", timeout=30)
    finally:
        stop_server(s)
    assert r.status_code == 200 and r.content == b"ok"
    log = s.log()
    assert "misbehave says hello on stdout" in log and "misbehave says hello on stderr" in log, log[-2000:]
    assert "stream=\"stdout\"" in log or "stream=stdout" in log, log[-2000:]
    assert "\x1b[31m" not in log, "a plugin's control characters are escaped"
    # At the default level the output is not kept at all.
    quiet = one_plugin(tmp_path / "quiet", "printer", 'mode = "print"')
    try:
        requests.post(f"{quiet.url}/v1/models/printer:infer", data=b"ok", timeout=30)
    finally:
        stop_server(quiet)
    assert "misbehave says hello" not in quiet.log()


def test_an_input_the_model_refuses_is_the_plugins_500_not_the_clients_400(tmp_path):
    s = one_plugin(tmp_path, "shapeless", 'mode = "shape"')
    try:
        r = requests.post(f"{s.url}/v1/models/shapeless:infer", data=b"whatever the client sends", timeout=30)
    finally:
        stop_server(s)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert "plugin shapeless@1 (plugins/handler.wasm) gave its model an input it refuses" in error, error


def test_typed_config_takes_lists_and_tables_and_names_a_wrong_key(tmp_path):
    config = 'mode = "config", classes = ["cat", "dog"], scale = { mean = 0.5, std = 2.0 }, top_k = 3'
    s = one_plugin(tmp_path, "configured", config)
    try:
        r = requests.post(f"{s.url}/v1/models/configured:infer", data=b"", timeout=30)
    finally:
        stop_server(s)
    assert r.status_code == 200, r.text
    assert r.json() == {"mode": "config", "classes": ["cat", "dog"], "scale": {"mean": 0.5, "std": 2.0}, "top_k": 3}
    wrong = 'mode = "config", classes = ["cat"], scale = { mean = 0.5 }, top_k = "three"'
    s = one_plugin(tmp_path / "wrong", "configured", wrong)
    try:
        r = requests.post(f"{s.url}/v1/models/configured:infer", data=b"", timeout=30)
    finally:
        stop_server(s)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert "plugin configured@1" in error and "bundle config `top_k`" in error, error


def test_a_model_less_bundle_serves_its_plugin_and_refuses_the_tensor_apis(tmp_path):
    repo = tmp_path / "repo"
    d = repo / "echo" / "1"
    os.makedirs(d / "plugins")
    shutil.copy(os.path.join(WASM, "misbehave.wasm"), d / "plugins" / "handler.wasm")
    (d / "bundle.toml").write_text('[bundle]\nname = "echo"\nversion = 1\n\n'
                                   '[handler]\npath = "plugins/handler.wasm"\nconfig = { mode = "echo" }\n')
    s = start_server(str(repo), str(tmp_path))
    try:
        r = requests.post(f"{s.url}/v1/models/echo:infer", data=b"no model needed", timeout=30)
        predict = requests.post(f"{s.url}/v1/models/echo:predict", json={"instances": [[1.0]]}, timeout=30)
        status = requests.get(f"{s.url}/v1/models/echo", timeout=30).json()
    finally:
        stop_server(s)
    assert r.status_code == 200 and r.content == b"no model needed", r.text
    assert predict.status_code == 400 and ":infer" in predict.json()["error"], predict.text
    assert status["model_version_status"][0]["state"] == "AVAILABLE"


def chained(repo, name, dependencies, model):
    d = repo / name / "1"
    os.makedirs(d / "plugins")
    shutil.copy(os.path.join(WASM, "misbehave.wasm"), d / "plugins" / "handler.wasm")
    (d / "bundle.toml").write_text(
        f'[bundle]\nname = "{name}"\nversion = 1\n\n[handler]\npath = "plugins/handler.wasm"\n'
        f'dependencies = {json.dumps(dependencies)}\nconfig = {{ mode = "chain", model = "{model}" }}\n')


def test_a_plugin_calls_the_models_it_declares_and_only_those(tmp_path):
    """A model-less bundle that declares mlp as a dependency runs it (the answer equals
    mlp's own :predict); a model it did not declare is the plugin's 500, and a pinned
    version that does not exist is a 503 the client may retry."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(EXAMPLES, "mlp"), repo / "mlp")
    chained(repo, "front", ["mlp"], "mlp")
    chained(repo, "sneaky", ["mlp"], "digits")
    chained(repo, "pinned", ["mlp@7"], "mlp")
    rows = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]]
    s = start_server(str(repo), str(tmp_path), "--readiness", "any")
    try:
        direct = requests.post(f"{s.url}/v1/models/mlp:predict", json={"instances": rows}, timeout=30)
        front = requests.post(f"{s.url}/v1/models/front:infer", json=rows, timeout=30)
        sneaky = requests.post(f"{s.url}/v1/models/sneaky:infer", json=rows, timeout=30)
        pinned = requests.post(f"{s.url}/v1/models/pinned:infer", json=rows, timeout=30)
    finally:
        stop_server(s)
    assert direct.status_code == 200 and front.status_code == 200, (direct.text, front.text)
    expected = [v for row in direct.json()["predictions"] for v in row]
    assert front.json() == expected, (front.json(), expected)
    assert sneaky.status_code == 500, sneaky.text
    error = sneaky.json()["error"]
    assert "plugin sneaky@1" in error and "[handler] dependencies" in error, error
    assert pinned.status_code == 503, pinned.text
    assert "dependency mlp@7" in pinned.json()["error"], pinned.text


def test_a_dependency_that_is_malformed_or_the_bundle_itself_is_refused(tmp_path):
    repo = tmp_path / "repo"
    chained(repo, "selfish", ["selfish"], "selfish")
    chained(repo, "twice", ["mlp", "mlp@stable"], "mlp")
    chained(repo, "odd", ["../mlp"], "mlp")
    for name, why in [("selfish", "own model"), ("twice", "declared twice"), ("odd", "not valid")]:
        out = subprocess.run([NNSERVE, "bundle", "pack", "-o", str(tmp_path / f"{name}.tar.gz"),
                              str(repo / name / "1")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and why in out.stderr + out.stdout, (name, out.stdout, out.stderr)


def init_bundle(repo, name, init, config='mode = "init"'):
    d = plugin_bundle(repo, name, "misbehave.wasm", config)
    if init:
        toml = os.path.join(d, "bundle.toml")
        text = open(toml).read().replace('path = "plugins/handler.wasm"\n',
                                         'path = "plugins/handler.wasm"\ninit = true\n')
        open(toml, "w").write(text)


def test_init_runs_once_at_load_and_every_request_starts_from_its_state(tmp_path):
    """With `init = true` each request's fresh instance starts from the snapshot taken
    after init: init's work is there (init_calls 1), and what a request changes is not
    (requests_seen stays 1). Without it, init never runs. A failing init fails the load
    with its message, and the other versions serve on."""
    repo = str(tmp_path / "repo")
    init_bundle(repo, "once", True)
    init_bundle(repo, "never", False)
    init_bundle(repo, "failing", True, 'mode = "init", init_fails = true')
    s = start_server(repo, str(tmp_path), "--readiness", "any")
    try:
        once = [requests.post(f"{s.url}/v1/models/once:infer", data=b"x", timeout=30).json() for _ in range(3)]
        never = requests.post(f"{s.url}/v1/models/never:infer", data=b"x", timeout=30).json()
        failing = requests.get(f"{s.url}/v1/models/failing", timeout=30).json()
        log = s.log()
    finally:
        stop_server(s)
    assert once == [{"init_calls": 1, "requests_seen": 1}] * 3, once
    assert never == {"init_calls": 0, "requests_seen": 1}, never
    status = failing["model_version_status"][0]
    assert status["state"] == "END" and "init failed" in status["status"]["error_message"], status
    assert "misbehave's init fails on purpose" in status["status"]["error_message"], status
    assert log.count("misbehave init ran") == 1, log[-3000:]


def test_bundle_run_answers_one_request_without_a_server(tmp_path):
    d = plugin_bundle(str(tmp_path / "repo"), "printer", "misbehave.wasm", 'mode = "print"')
    out = subprocess.run([NNSERVE, "bundle", "run", d, "--body", "hello"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("200 OK\n") and "x-nnserve-variant: printer@1" in out.stdout
    assert out.stdout.endswith("\n\nhello\n"), out.stdout
    assert "misbehave says hello on stdout" in out.stderr and "on stderr" in out.stderr, out.stderr
    # The same bundle packed, with the body from a file; then a bundle without a plugin.
    archive = str(tmp_path / "printer.tar.gz")
    subprocess.run([NNSERVE, "bundle", "pack", d, "-o", archive], check=True, capture_output=True)
    (tmp_path / "body.bin").write_bytes(b"\x00\x01binary")
    out = subprocess.run([NNSERVE, "bundle", "run", archive, "--body", f"@{tmp_path / 'body.bin'}"],
                         capture_output=True, timeout=120)
    assert out.returncode == 0 and out.stdout.endswith(b"\n\n\x00\x01binary\n"), out
    out = subprocess.run([NNSERVE, "bundle", "run", os.path.join(EXAMPLES, "mlp", "1"),
                          "--json", '{"instances": [[1, 2, 3, 4]]}'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and '"predictions"' in out.stdout, out
    # A failing answer is printed and exits 1.
    bad = plugin_bundle(str(tmp_path / "repo2"), "panicky", "misbehave.wasm", 'mode = "panic"')
    out = subprocess.run([NNSERVE, "bundle", "run", bad], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout.startswith("500 ") and "panicked" in out.stdout, out


def packed_digest(directory, tmp_path):
    out = subprocess.run([NNSERVE, "bundle", "pack", directory, "-o", str(tmp_path / "d.tar.gz")],
                         capture_output=True, text=True, check=True).stdout
    return out.rsplit("digest ", 1)[1].strip()


def served_digest(url, model):
    models = requests.get(f"{url}/v1/models", timeout=10).json()["models"]
    (versions,) = [m["versions"] for m in models if m["name"] == model]
    return versions[0]["digest"]


def test_a_served_version_edited_in_place_reloads_and_its_digest_follows(tmp_path):
    repo = str(tmp_path / "repo")
    d = plugin_bundle(repo, "edited", "misbehave.wasm", 'mode = "echo"')
    toml = os.path.join(d, "bundle.toml")
    s = start_server(repo, str(tmp_path), "--poll-interval-ms", "200")
    try:
        assert requests.post(f"{s.url}/v1/models/edited:infer", data=b"hi", timeout=30).status_code == 200
        before = served_digest(s.url, "edited")
        with open(toml) as f:
            text = f.read()
        with open(toml, "w") as f:
            f.write(text.replace('mode = "echo"', 'mode = "panic"'))
        deadline = time.time() + 30
        while requests.post(f"{s.url}/v1/models/edited:infer", data=b"hi", timeout=30).status_code == 200:
            assert time.time() < deadline, s.log()[-3000:]
            time.sleep(0.05)
        assert "reloading the version in place" in s.log()
        after = served_digest(s.url, "edited")
        assert after != before and after == packed_digest(d, tmp_path)
    finally:
        stop_server(s)
    # Edited while the server was down: the restarted server reports the files' digest.
    with open(toml, "w") as f:
        f.write(text)
    s = start_server(repo, str(tmp_path))
    try:
        assert served_digest(s.url, "edited") == packed_digest(d, tmp_path) == before
        assert requests.post(f"{s.url}/v1/models/edited:infer", data=b"hi", timeout=30).content == b"hi"
    finally:
        stop_server(s)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_crate(crate):
    """cargo build --release in a scaffolded crate. Its target/ is the workspace's and its
    lockfile the workspace's, so the SDK's dependencies are not compiled a second time."""
    shutil.copy(os.path.join(ROOT, "Cargo.lock"), os.path.join(crate, "Cargo.lock"))
    os.symlink(os.path.join(ROOT, "target"), os.path.join(crate, "target"))
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=crate, check=True, timeout=900)


def test_a_scaffolded_crate_builds_runs_offline_and_serves_after_a_push(tmp_path):
    crate = str(tmp_path / "hello-plugin")
    new = subprocess.run([NNSERVE, "plugin", "new", crate], capture_output=True, text=True, timeout=60)
    assert new.returncode == 0, new.stderr
    assert "depending on the SDK at" in new.stdout and "cargo build --release" in new.stdout
    started = time.monotonic()
    build_crate(crate)
    run = subprocess.run([NNSERVE, "bundle", "run", crate, "--json", '{"name": "you"}'],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith('{"message":"hello, you!"}\n'), run.stdout
    assert "greeting you" in run.stderr, "the plugin's log is shown"
    archive = str(tmp_path / "hello.tar.gz")
    subprocess.run([NNSERVE, "bundle", "pack", crate, "-o", archive], check=True, capture_output=True)

    with tarfile.open(archive) as t:
        names = sorted(n for n in t.getnames() if not n.endswith("/"))
    assert names == ["bundle.toml", "plugins/handler.wasm", "warmup/00.json"], names
    repo = str(tmp_path / "repo")
    os.makedirs(repo)
    s = start_server(repo, str(tmp_path))
    try:
        push = subprocess.run([NNSERVE, "bundle", "push", archive, "--server", s.url],
                              capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        r = requests.post(f"{s.url}/v1/models/hello-plugin:infer", json={"name": "you"}, timeout=30)
        assert r.status_code == 200 and r.json() == {"message": "hello, you!"}, r.text
        bad = requests.post(f"{s.url}/v1/models/hello-plugin:infer", data=b"not json", timeout=30)
        assert bad.status_code == 400, bad.text
    finally:
        stop_server(s)
    print(f"\nplugin new -> built -> bundle run -> pack -> push -> served: {time.monotonic() - started:.1f} s")


def test_a_model_given_to_plugin_new_is_copied_in_with_marked_placeholders(tmp_path):
    crate = tmp_path / "with-model"
    out = subprocess.run([NNSERVE, "plugin", "new", str(crate), "--model", MLP_MODEL,
                          "--sdk", os.path.join(ROOT, "sdk")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (crate / "model" / "model.pt").read_bytes() == open(MLP_MODEL, "rb").read()
    toml = (crate / "bundle.toml").read_text()
    assert 'backend = "torchscript"' in toml and "TODO" in toml
    # The input names are forward()'s own (examples/make_models.py: `def forward(self, x)`).
    model = tomllib.loads(toml)["model"]
    assert [t["name"] for t in model["inputs"]] == ["x"], toml
    assert [t["name"] for t in model["outputs"]] == ["output"], toml
    saved = tmp_path / "tf-plugin"
    out = subprocess.run([NNSERVE, "plugin", "new", str(saved), "--model",
                          os.path.join(EXAMPLES, "tf-mlp", "1", "model", "saved_model")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and (saved / "model" / "saved_model" / "saved_model.pb").is_file(), out.stderr
    assert 'backend = "tensorflow"' in (saved / "bundle.toml").read_text()
    again = subprocess.run([NNSERVE, "plugin", "new", str(crate)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists already" in again.stderr


def test_dev_rebuilds_on_an_edit_and_serves_it_as_the_same_version(tmp_path):
    crate = str(tmp_path / "loop-plugin")
    subprocess.run([NNSERVE, "plugin", "new", crate], check=True, capture_output=True, timeout=60)
    build_crate(crate)
    log = open(tmp_path / "dev.log", "w")
    proc = subprocess.Popen([NNSERVE, "dev", crate, "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        url = None
        for line in proc.stdout:
            if "nnserve listening on " in line:
                url = line.split("listening on ", 1)[1].strip()
                break
        assert url, (tmp_path / "dev.log").read_text()
        infer = f"{url}/v1/models/loop-plugin:infer"
        assert requests.post(infer, json={"name": "a"}, timeout=30).json() == {"message": "hello, a!"}
        src = os.path.join(crate, "src", "lib.rs")
        with open(src) as f:
            text = f.read()
        with open(src, "w") as f:
            f.write(text.replace('format!("{}, {}!"', 'format!("{} there, {}!"'))
        edited = time.monotonic()
        deadline = edited + 120
        while requests.post(infer, json={"name": "a"}, timeout=30).json() != {"message": "hello there, a!"}:
            assert time.monotonic() < deadline, (tmp_path / "dev.log").read_text()[-3000:]
            time.sleep(0.05)
        took = time.monotonic() - edited
        versions = requests.get(f"{url}/v1/models/loop-plugin", timeout=10).json()["model_version_status"]
        assert [v["version"] for v in versions] == ["1"], versions
        print(f"\nnnserve dev: edit -> rebuilt -> reloaded -> new answer in {took:.2f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log.close()
