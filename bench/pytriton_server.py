"""Triton's own gRPC, the peer of nnserve's, through PyTriton (PyPI `nvidia-pytriton`,
which ships Triton's server binary): the same two models as nnserve's examples, mlp
(TorchScript, FP32 [n, 4] -> [n, 3], dynamic batching up to 64 rows) and digits (one PNG
as a BYTES input [1] through the same preprocessing as bench/torchserve_handlers, its
answer as the BYTES output `body`), with torch at one thread as nnserve's default.

Runs in its own venv (bench/protocols.py makes it: PyTriton pins numpy below 2, which the main
venv's TensorFlow does not take), with the main venv's site-packages after its own for
torch and PIL. Usage: pytriton_server.py EXAMPLES_DIR GRPC_PORT HTTP_PORT; prints READY."""
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "torchserve_handlers"))
from digits_handler import _preprocess  # noqa: E402  (the peer's preprocessing)

torch.set_num_threads(1)
examples, grpc_port, http_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mlp = torch.jit.load(os.path.join(examples, "mlp", "1", "model", "model.pt")).eval()
digits = torch.jit.load(os.path.join(examples, "digits", "1", "model", "model.pt")).eval()


@batch
def infer_mlp(input):
    with torch.no_grad():
        return {"output": mlp(torch.from_numpy(input)).numpy()}


def infer_digits(requests):
    out = []
    for r in requests:
        x = torch.stack([_preprocess(bytes(b)) for b in r["request"].reshape(-1)])
        with torch.no_grad():
            p = torch.softmax(digits(x), dim=1)
        s, i = p.topk(3, dim=1)
        answer = json.dumps({"predictions": [{"label": str(int(c)), "score": float(v)}
                                             for v, c in zip(s[0].tolist(), i[0].tolist())]})
        out.append({"body": np.array([answer.encode()], dtype=np.object_)})
    return out


config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=0, log_verbose=0)
with Triton(config=config) as triton:
    triton.bind(model_name="mlp", infer_func=infer_mlp,
                inputs=[Tensor(name="input", dtype=np.float32, shape=(4,))],
                outputs=[Tensor(name="output", dtype=np.float32, shape=(3,))],
                config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0)))
    triton.bind(model_name="digits", infer_func=infer_digits,
                inputs=[Tensor(name="request", dtype=np.bytes_, shape=(1,))],
                outputs=[Tensor(name="body", dtype=np.bytes_, shape=(1,))],
                config=ModelConfig(batching=False))
    print("READY", flush=True)
    triton.serve()
