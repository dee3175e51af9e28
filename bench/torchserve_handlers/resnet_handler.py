"""TorchServe handler for the ResNet-18 TorchScript model, the peer of nnserve's
imagenet-classifier plugin: JPEG/PNG bytes in, torchvision's Resize(256) / CenterCrop(224) /
ToTensor / Normalize on the PIL image, one forward per batch, softmax, top-5
`{"predictions": [{"label": "class N", "score": s}, ...]}` out. Torch threads from
TS_BENCH_THREADS (bench/torchserve.py sets it)."""
import io
import os

import torch
from PIL import Image
from torchvision import transforms

_model = None
_preprocess = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


def _init(context):
    global _model
    threads = int(os.environ.get("TS_BENCH_THREADS", "1"))
    if threads > 0:  # 0: leave torch's default (one per core)
        torch.set_num_threads(threads)
    model_dir = context.system_properties.get("model_dir")
    _model = torch.jit.load(os.path.join(model_dir, "model.pt")).eval()


def handle(data, context):
    if _model is None:
        _init(context)
    if data is None:
        return None
    images = []
    for req in data:
        body = req.get("body") or req.get("data")
        images.append(_preprocess(Image.open(io.BytesIO(body)).convert("RGB")))
    with torch.no_grad():
        p = torch.softmax(_model(torch.stack(images)), dim=1)
    s, i = p.topk(5, dim=1)
    return [{"predictions": [{"label": f"class {int(c)}", "score": float(v)} for v, c in zip(sr, ir)]}
            for sr, ir in zip(s.tolist(), i.tolist())]
