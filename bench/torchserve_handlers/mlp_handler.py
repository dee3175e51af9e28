"""TorchServe handler for the mlp TorchScript model, the peer of nnserve's `:predict`:
a JSON body `{"instances": [[...4 floats...], ...]}` in, `{"predictions": [[...3...], ...]}` out.
Module-level `handle` (TorchServe's minimal handler form); torch threads from
TS_BENCH_THREADS (bench/torchserve.py sets it)."""
import json
import os

import torch

_model = None


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
    rows, counts = [], []
    for req in data:
        body = req.get("body") or req.get("data")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        inst = body["instances"]
        rows.extend(inst)
        counts.append(len(inst))
    with torch.no_grad():
        out = _model(torch.tensor(rows, dtype=torch.float32)).tolist()
    answers, i = [], 0
    for n in counts:
        answers.append({"predictions": out[i:i + n]})
        i += n
    return answers
