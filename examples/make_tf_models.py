#!/usr/bin/env python3
"""Make the TensorFlow example models as SavedModels, with seeded weights (nothing
downloaded).

- tf-mlp:    the mlp example's twin in TensorFlow: a seeded 4 -> 16 -> 3 MLP as a
             `tf.Module`, signature `serving_default` with input `input` [-1, 4] fp32 and
             output `output` [-1, 3] fp32.
- digits-tf: the digits CNN trained in Keras (seeded) on the same scikit-learn split as
             `digits`, exported with Keras `model.export()`: input `input` [-1, 1, 8, 8]
             fp32 (NCHW, pixels 0..16, as the image-classifier plugin sends them; the model
             transposes to NHWC and scales inside), output `output_0` [-1, 10] logits.
             Prints its held-out accuracy.

Usage: python examples/make_tf_models.py [--repository DIR]   (default: examples/repository)
"""
import argparse
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter

import sys  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_data  # noqa: E402


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


def make_digits_tf(path, epochs=40):
    """Trains the digits CNN in Keras and exports it as a SavedModel at `path`."""
    import keras
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = digits_data.split()
    x_train = x_train.reshape(-1, 1, 8, 8).astype(np.float32)
    x_test = x_test.reshape(-1, 1, 8, 8).astype(np.float32)
    inp = keras.Input(shape=(1, 8, 8), name="input")
    x = keras.layers.Permute((2, 3, 1))(inp)  # NCHW -> NHWC: TF's CPU convolutions
    x = keras.layers.Rescaling(1.0 / 16.0)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    out = keras.layers.Dense(10)(x)  # logits
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    acc = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    print(f"digits-tf: held-out accuracy {acc:.4f} on {len(y_test)} images")
    if acc < 0.95:
        sys.exit(f"digits-tf: accuracy {acc:.4f} is below 0.95; training went wrong")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.export(tmp, verbose=False)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repository", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "repository"))
    args = ap.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(min(2, os.cpu_count() or 1))
    make_tf_mlp(os.path.join(args.repository, "tf-mlp", "1", "model", "saved_model"))
    make_digits_tf(os.path.join(args.repository, "digits-tf", "1", "model", "saved_model"))


if __name__ == "__main__":
    main()
