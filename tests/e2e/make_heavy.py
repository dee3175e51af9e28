"""Writes a TorchScript model slow enough (a few ms on CPU) that nnserve runs its forward
in block_in_place: input `input` [-1, 1, 8, 8] fp32 -> `logits` [-1, 10], seeded.
Usage: make_heavy.py PATH"""
import sys

import torch
from torch import nn

if __name__ == "__main__":
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(),
                          nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10)).eval()
    torch.jit.script(model).save(sys.argv[1])
