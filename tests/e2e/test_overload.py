"""When every pooled plugin instance is busy, a request gets 503 with Retry-After, not a
trap; the server reads its settings from a config file (`--config`)."""
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
    time.sleep(0.4)  # the slow request now holds the only instance slot
    r = requests.post(f"{url}/v1/models/echo:infer", data=b"ping")
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert "instance slots are busy" in r.json()["error"]
    t.join(timeout=30)
    # The config file's deadline (1500 ms) ended the slow one.
    assert result["slow"].status_code == 504 and "1500 ms" in result["slow"].json()["error"]
    r = requests.post(f"{url}/v1/models/echo:infer", data=b"ping")
    assert r.status_code == 200 and r.content == b"ping"
