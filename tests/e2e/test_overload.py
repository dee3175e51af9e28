"""When every pooled plugin instance is busy, a request gets 503 with Retry-After, not a
trap; freed slots kept warm are bounded by `plugin_warm_slots`; the server reads its
settings from a config file (`--config`)."""
import os
import threading
import time

import pytest
import requests

from conftest import plugin_bundle, start_server, stop_server


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("one-slot"))
    repo = os.path.join(tmp, "repository")
    os.makedirs(repo)
    plugin_bundle(repo, "echo", "misbehave.wasm", 'mode = "echo"')
    plugin_bundle(repo, "slow", "misbehave.wasm", 'mode = "loop"', "memory_mib = 64, cpu_ms = 60000")
    config = os.path.join(tmp, "nnserve.toml")
    with open(config, "w") as f:
        f.write("plugin_instance_slots = 1\nrequest_timeout_ms = 1500\n")
    s = start_server(repo, tmp, "--config", config)
    yield s
    stop_server(s)


def test_busy_slots_give_503_with_retry_after_then_recover(one_slot_server):
    url = one_slot_server.url
    result = {}

    def hold_the_slot():
        result["slow"] = requests.post(f"{url}/v1/models/slow:infer", data=b"x")

    t = threading.Thread(target=hold_the_slot)
    t.start()
    # The slow request holds the only instance slot once the pool says so.
    deadline = time.monotonic() + 30
    while pool_gauges(url)["nnserve_plugin_instances"] != 1:
        assert time.monotonic() < deadline, "the slow plugin never started"
    r = requests.post(f"{url}/v1/models/echo:infer", data=b"ping")
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert "instance slots are busy" in r.json()["error"]
    t.join(timeout=30)
    # The config file's deadline (1500 ms) ended the slow one.
    assert result["slow"].status_code == 504 and "1500 ms" in result["slow"].json()["error"]
    r = requests.post(f"{url}/v1/models/echo:infer", data=b"ping")
    assert r.status_code == 200 and r.content == b"ping"


def pool_gauges(url):
    """The plugin pool's gauges from /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("nnserve_plugin_")}


def test_freed_plugin_slots_kept_warm_are_at_most_plugin_warm_slots(tmp_path):
    """Each plugin keeps its freed slot warm (4 MiB resident) until `plugin_warm_slots`
    are; a plugin without one then takes the least recently used, not a slot never
    used. Without the bound (wasmtime's default: 100) every plugin here kept its own."""
    repo = os.path.join(tmp_path, "repository")
    names = [f"echo{i}" for i in range(5)]
    for name in names:
        plugin_bundle(repo, name, "misbehave.wasm", 'mode = "echo"')
    config = os.path.join(tmp_path, "nnserve.toml")
    with open(config, "w") as f:
        # Under 128 slots the pool is one shard, so the bound is exact.
        f.write("plugin_instance_slots = 16\nplugin_warm_slots = 2\n")
    s = start_server(repo, str(tmp_path), "--config", config)
    try:
        for _ in range(3):
            for name in names:
                r = requests.post(f"{s.url}/v1/models/{name}:infer", data=name.encode(), timeout=30)
                assert r.status_code == 200 and r.content == name.encode(), r.text
        g = pool_gauges(s.url)
    finally:
        stop_server(s)
    assert g["nnserve_plugin_instances"] == 0 and g["nnserve_plugin_memories"] == 0, g
    assert 1 <= g["nnserve_plugin_warm_memories"] <= 2, g
    assert 0 < g["nnserve_plugin_warm_memory_resident_bytes"] <= 2 * (4 << 20), g
