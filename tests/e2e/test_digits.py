"""A user posts photos of digits to the `digits` model through its image-classifier
plugin and gets the same answers as a Python reference of the same preprocessing."""
import io
import os

import numpy as np
import pytest
from PIL import Image

import digits_data
from conftest import EXAMPLES
from reference import Reference

DIGITS = os.path.join(EXAMPLES, "digits", "1")


def render(pixels, i):
    """A held-out 8x8 digit as an image a user might send: enlarged to a size that
    varies, sometimes dark ink on a bright ground, sometimes colour."""
    grey = (pixels.reshape(8, 8) * 255.0 / 16.0).round().astype(np.uint8)
    side = [8, 28, 32, 50, 64][i % 5]
    img = Image.fromarray(grey, "L").resize((side, side), Image.NEAREST if i % 2 else Image.BILINEAR)
    if i % 3 == 1:
        img = Image.fromarray(255 - np.asarray(img))  # a scan: dark on bright
    if i % 4 == 2:
        img = img.convert("RGB")
    return img


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference():
    labels = open(os.path.join(DIGITS, "assets", "labels.txt")).read().split("\n")
    return Reference(os.path.join(DIGITS, "model", "model.pt"), labels)


@pytest.fixture(scope="module")
def held_out():
    (_, _), (x, y) = digits_data.split()
    return x, y


def classify(http, server, body):
    r = http.post(f"{server.url}/v1/models/digits:infer", data=body,
                  headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    return [(p["label"], p["score"]) for p in r.json()["predictions"]]


def test_png_predictions_equal_the_python_reference_item_for_item(server, http, reference, held_out):
    x, y = held_out
    correct = 0
    for i in range(len(x)):
        body = encode(render(x[i], i), "PNG")
        got = classify(http, server, body)
        want = reference.predict(body)
        assert [l for l, _ in got] == [l for l, _ in want], f"image {i}: {got} != {want}"
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4, atol=1e-5)
        correct += got[0][0] == str(y[i])
    # The plugin and model together still classify the held-out set well.
    assert correct / len(x) >= 0.9, correct / len(x)


def test_jpeg_predictions_agree_with_the_python_reference(server, http, reference, held_out):
    x, _ = held_out
    agree = 0
    for i in range(len(x)):
        body = encode(render(x[i], i), "JPEG")
        agree += classify(http, server, body)[0][0] == reference.predict(body)[0][0]
    assert agree / len(x) >= 0.99, f"top-1 agreement {agree}/{len(x)}"


def test_top_k_follows_the_bundle_config(server, http, held_out):
    x, _ = held_out
    got = classify(http, server, encode(render(x[0], 0), "PNG"))
    assert len(got) == 3
    assert got[0][1] >= got[1][1] >= got[2][1]
    assert all(label in [str(d) for d in range(10)] for label, _ in got)


def test_a_slow_model_behind_a_plugin_and_over_predict_keeps_serving(server, http, held_out):
    """Forwards that take milliseconds run in block_in_place, also from inside a plugin's
    wasi-nn compute; answers stay well-formed and other models keep answering."""
    x, _ = held_out
    body = encode(render(x[0], 0), "PNG")
    for _ in range(5):
        r = http.post(f"{server.url}/v1/models/heavy:infer", data=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 3
        r = http.post(f"{server.url}/v1/models/heavy:predict",
                      json={"instances": [x[0].reshape(1, 8, 8).tolist()]})
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"][0]) == 10
        assert http.post(f"{server.url}/v1/models/mlp:predict",
                         json={"instances": [[1, 2, 3, 4]]}).status_code == 200
