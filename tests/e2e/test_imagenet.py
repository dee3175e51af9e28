"""The imagenet-classifier plugin, as built for wasm (its SIMD path runs only there),
against torchvision's evaluation transform done with Pillow and NumPy: PNG in (lossless,
so no decoder differences), Resize with PIL's bilinear filter, CenterCrop, ToTensor,
Normalize, through the same probe model."""
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import WASM, start_server, stop_server, write_bundle

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# (name, resize, crop): the ImageNet default, and a crop whose rows are not a whole number
# of the plugin's 16-pixel SIMD groups (227 = 14 x 16 + 3), so its tail path runs too.
PROBES = [("probe", 256, 224), ("probe227", 240, 227)]


def probe_bundle(repo, name, resize, crop):
    d = write_bundle(repo, name,
                     f'{{ name = "input", dtype = "fp32", shape = [-1, 3, {crop}, {crop}] }}',
                     '{ name = "logits", dtype = "fp32", shape = [-1, 16] }', handler=f"""
[handler]
path = "plugins/handler.wasm"
config = {{ top_k = "16", resize = "{resize}", crop = "{crop}" }}
limits = {{ memory_mib = 64, cpu_ms = 2000 }}
""")
    os.makedirs(os.path.join(d, "plugins"))
    model = os.path.join(d, "model", "model.pt")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_probe.py"), model,
                    str(crop)], check=True)
    shutil.copy(os.path.join(WASM, "imagenet_classifier.wasm"), os.path.join(d, "plugins", "handler.wasm"))
    return torch.jit.load(model)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("imagenet"))
    repo = os.path.join(tmp, "repository")
    models = {name: probe_bundle(repo, name, resize, crop) for name, resize, crop in PROBES}
    s = start_server(repo, tmp)
    yield s, models
    stop_server(s)


def reference_scores(png, model, resize, crop):
    """torchvision's Resize(resize)/CenterCrop(crop)/ToTensor/Normalize on the PIL image,
    the probe's logits, softmax."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = img.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    x = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    x = (x / np.float32(255) - MEAN) / STD
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        return torch.softmax(model(t)[0], 0).numpy()


@pytest.mark.parametrize("probe", PROBES, ids=[p[0] for p in PROBES])
@pytest.mark.parametrize("size", [(256, 256), (300, 241), (225, 331)])
def test_the_plugin_preprocesses_as_torchvision_does(imagenet, http, probe, size):
    server, models = imagenet
    name, resize, crop = probe
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    r = http.post(f"{server.url}/v1/models/{name}:infer", data=buf.getvalue(),
                  headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    got = {int(p["label"]): p["score"] for p in r.json()["predictions"]}
    assert sorted(got) == list(range(16))
    want = reference_scores(buf.getvalue(), models[name], resize, crop)
    worst = max(abs(got[k] - want[k]) / want[k] for k in range(16))
    # The logits are O(1), so a value out of place moves a score by about 1e-3 or more;
    # float rounding (the plugin normalises by a multiply-add, libtorch may sum in another
    # order) gave 1.3e-6 to 2.1e-6 here.
    assert worst < 2e-5, f"largest relative score difference {worst:.2e}: {got} against {list(want)}"
