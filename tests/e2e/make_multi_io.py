"""Writes two TorchScript models with inputs a (fp32 [n, 2]) and b (int64 [n]):
DICT_PATH returns a dict, TUPLE_PATH a tuple. Usage: make_multi_io.py DICT_PATH TUPLE_PATH"""
import sys
from typing import Dict, Tuple

import torch
from torch import Tensor, nn


class Dicty(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Dict[str, Tensor]:
        return {"total": a.sum(1), "scaled": a * b.unsqueeze(1).to(a.dtype)}


class Tuply(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
        return a + 1.0, b * 2


if __name__ == "__main__":
    torch.jit.script(Dicty()).save(sys.argv[1])
    torch.jit.script(Tuply()).save(sys.argv[2])
