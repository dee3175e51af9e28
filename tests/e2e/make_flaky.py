#!/usr/bin/env python3
"""Writes a TorchScript MLP (4 -> 3, seeded) that fails its forward for any row whose
first value is above 100, so a test controls which requests fail: the canary variant.

Usage: python make_flaky.py OUT.pt [SEED]"""
import os
import sys

import torch
from torch import nn


class Flaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        if bool((x[:, 0] > 100.0).any()):
            raise RuntimeError("flaky: a row's first value is above 100")
        return self.net(x)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.manual_seed(int(sys.argv[2]) if len(sys.argv) > 2 else 7)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.jit.script(Flaky().eval()).save(out)
