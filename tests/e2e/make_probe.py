"""Writes a TorchScript "probe" for the imagenet-classifier plugin: input [n, 3, CROP, CROP],
logits [n, 16], each logit a fixed random weighting of every input value (seeded), so a
value that the plugin's preprocessing puts in the wrong place or gets wrong moves the
scores. Usage: make_probe.py MODEL_PATH [CROP (224)]"""
import sys

import torch
from torch import Tensor, nn


class Probe(nn.Module):
    def __init__(self, crop: int):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        n = 3 * crop * crop
        self.weight = nn.Parameter(torch.randn(16, n, generator=g) / n ** 0.5, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.t()


if __name__ == "__main__":
    crop = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    torch.jit.script(Probe(crop).eval()).save(sys.argv[1])
