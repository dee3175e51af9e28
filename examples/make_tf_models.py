#!/usr/bin/env python3
"""Make the TensorFlow example models as SavedModels, with seeded weights (nothing
downloaded).

- tf-mlp: the mlp example's twin in TensorFlow: a seeded 4 -> 16 -> 3 MLP as a `tf.Module`,
          signature `serving_default` with input `input` [-1, 4] fp32 and output `output`
          [-1, 3] fp32.

Usage: python examples/make_tf_models.py [--repository DIR]   (default: examples/repository)
"""
import argparse
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class Mlp(tf.Module):
    def __init__(self, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w1 = tf.Variable(rng.normal(size=(4, 16)).astype(np.float32) * 0.5)
        self.b1 = tf.Variable(rng.normal(size=(16,)).astype(np.float32) * 0.1)
        self.w2 = tf.Variable(rng.normal(size=(16, 3)).astype(np.float32) * 0.5)
        self.b2 = tf.Variable(rng.normal(size=(3,)).astype(np.float32) * 0.1)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="input")])
    def serve(self, input):
        h = tf.nn.relu(tf.matmul(input, self.w1) + self.b1)
        return {"output": tf.matmul(h, self.w2) + self.b2}


def save(module, path, signatures):
    """Writes a SavedModel at `path` atomically (never half-written)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures=signatures)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    print(f"wrote {path}")


def make_tf_mlp(path, seed=0):
    """A seeded TF MLP SavedModel at `path` (a version's `model/saved_model`)."""
    m = Mlp(seed)
    save(m, path, {"serving_default": m.serve})
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repository", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "repository"))
    args = ap.parse_args()
    make_tf_mlp(os.path.join(args.repository, "tf-mlp", "1", "model", "saved_model"))


if __name__ == "__main__":
    main()
