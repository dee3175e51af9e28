"""Writes a TorchScript "probe" for the imagenet-classifier plugin: input [n, 3, 224, 224],
logits [n, 16], each logit a fixed random weighting of every input value (seeded), so a
value that the plugin's preprocessing puts in the wrong place or gets wrong moves the
scores. Usage: make_probe.py MODEL_PATH"""
import sys

import torch
from torch import Tensor, nn


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        n = 3 * 224 * 224
        self.weight = nn.Parameter(torch.randn(16, n, generator=g) / n ** 0.5, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.t()


if __name__ == "__main__":
    torch.jit.script(Probe().eval()).save(sys.argv[1])
