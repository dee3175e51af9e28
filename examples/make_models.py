#!/usr/bin/env python3
"""Make the example models as TorchScript files, with seeded weights (nothing downloaded).

- mlp:    a tiny seeded MLP, input `input` [-1, 4] fp32 -> output `output` [-1, 3] fp32.
- mlp-a, mlp-b: the same MLP with seeds 1 and 2, the two variants behind the `mlp-ab`
          endpoint (an A/B test: they answer differently for the same input).
- digits: a small CNN trained here on scikit-learn's bundled 8x8 digits (seeded), input
          `input` [-1, 1, 8, 8] fp32 with the data set's pixel range 0..16, output
          `logits` [-1, 10]. Prints its held-out accuracy.

Usage: python examples/make_models.py [--repository DIR]   (default: examples/repository)
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_data  # noqa: E402


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class DigitsCnn(nn.Module):
    """Takes raw digits pixels (0..16) and scales them itself, so plugins need not."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x / 16.0))


def save(module, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    module.eval()
    scripted = torch.jit.script(module)
    tmp = path + ".tmp"
    scripted.save(tmp)
    os.replace(tmp, path)  # never leave a half-written model behind
    print(f"wrote {path}")


def make_mlp(repo, seed=0, version=1, name="mlp"):
    torch.manual_seed(seed)
    save(Mlp(), os.path.join(repo, name, str(version), "model", "model.pt"))


def make_digits(repo):
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits_data.split()
    x_train = torch.tensor(x_train, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y_train = torch.tensor(y_train, dtype=torch.long)
    model = DigitsCnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(40):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.tensor(x_test, dtype=torch.float32).reshape(-1, 1, 8, 8)).argmax(1).numpy()
    acc = float((pred == y_test).mean())
    print(f"digits: held-out accuracy {acc:.4f} on {len(y_test)} images")
    if acc < 0.95:
        sys.exit(f"digits: accuracy {acc:.4f} is below 0.95; training went wrong")
    save(model, os.path.join(repo, "digits", "1", "model", "model.pt"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "repository"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    make_mlp(args.repository)
    make_mlp(args.repository, seed=1, name="mlp-a")
    make_mlp(args.repository, seed=2, name="mlp-b")
    make_digits(args.repository)


if __name__ == "__main__":
    main()
