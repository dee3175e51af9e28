"""The imagenet-classifier plugin, as built for wasm (its SIMD path runs only there),
against torchvision's evaluation transform done with Pillow and NumPy: PNG in (lossless,
so no decoder differences), Resize(256) with PIL's bilinear filter, CenterCrop(224),
ToTensor, Normalize, through the same probe model."""
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import WASM, start_server, stop_server

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("imagenet"))
    d = os.path.join(tmp, "repository", "probe", "1")
    os.makedirs(os.path.join(d, "model"))
    os.makedirs(os.path.join(d, "plugins"))
    model = os.path.join(d, "model", "model.pt")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_probe.py"), model],
                   check=True)
    shutil.copy(os.path.join(WASM, "imagenet_classifier.wasm"), os.path.join(d, "plugins", "handler.wasm"))
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write("""
[bundle]
name = "probe"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
device = "cpu"
inputs = [{ name = "input", dtype = "fp32", shape = [-1, 3, 224, 224] }]
outputs = [{ name = "logits", dtype = "fp32", shape = [-1, 16] }]

[handler]
path = "plugins/handler.wasm"
config = { top_k = "16" }
limits = { memory_mib = 64, cpu_ms = 2000 }
""")
    s = start_server(os.path.join(tmp, "repository"), tmp)
    yield s, torch.jit.load(model)
    stop_server(s)


def reference_scores(png, model):
    """torchvision's Resize(256)/CenterCrop(224)/ToTensor/Normalize on the PIL image, the
    probe's logits, softmax."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = img.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    x = (x / np.float32(255) - MEAN) / STD
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        return torch.softmax(model(t)[0], 0).numpy()


@pytest.mark.parametrize("size", [(256, 256), (300, 241), (225, 331)])
def test_the_plugin_preprocesses_as_torchvision_does(imagenet, http, size):
    server, model = imagenet
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    r = http.post(f"{server.url}/v1/models/probe:infer", data=buf.getvalue(),
                  headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    got = {int(p["label"]): p["score"] for p in r.json()["predictions"]}
    assert sorted(got) == list(range(16))
    want = reference_scores(buf.getvalue(), model)
    worst = max(abs(got[k] - want[k]) / want[k] for k in range(16))
    # The logits are O(1), so a value out of place moves a score by about 1e-3 or more;
    # float rounding (the plugin normalises by a multiply-add, libtorch may sum in another
    # order) gave 1.3e-6 to 2.1e-6 here.
    assert worst < 2e-5, f"largest relative score difference {worst:.2e}: {got} against {list(want)}"
