"""TorchServe handler for the digits TorchScript model, the peer of nnserve's
image-classifier plugin (plugins/image-classifier): PNG/JPEG bytes in, grey (PIL's ITU-R 601
luma), inverted when the border is bright (dark ink on paper), area-averaged to 8x8 (PIL's
BOX filter), scaled to 0..16, one forward per batch, softmax, top-3
`{"predictions": [{"label": "N", "score": s}, ...]}` out. Torch threads from
TS_BENCH_THREADS (bench/torchserve.py sets it)."""
import io
import os

import numpy as np
import torch
from PIL import Image

_model = None


def _init(context):
    global _model
    threads = int(os.environ.get("TS_BENCH_THREADS", "1"))
    if threads > 0:  # 0: leave torch's default (one per core)
        torch.set_num_threads(threads)
    model_dir = context.system_properties.get("model_dir")
    _model = torch.jit.load(os.path.join(model_dir, "model.pt")).eval()


def _preprocess(body):
    grey = np.asarray(Image.open(io.BytesIO(body)).convert("L"), dtype=np.float32)
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    if border.mean() > 127.5:
        grey = 255.0 - grey
    small = Image.fromarray(grey, "F").resize((8, 8), Image.BOX)
    return torch.from_numpy(np.asarray(small) * (16.0 / 255.0)).reshape(1, 8, 8)


def handle(data, context):
    if _model is None:
        _init(context)
    if data is None:
        return None
    batch = torch.stack([_preprocess(req.get("body") or req.get("data")) for req in data])
    with torch.no_grad():
        p = torch.softmax(_model(batch), dim=1)
    s, i = p.topk(3, dim=1)
    return [{"predictions": [{"label": str(int(c)), "score": float(v)} for v, c in zip(sr, ir)]}
            for sr, ir in zip(s.tolist(), i.tolist())]
