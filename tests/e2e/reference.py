"""The image-classifier plugin's preprocessing, in Python (see plugins/image-classifier):
decode with Pillow, ITU-R 601 luma, invert dark-on-bright by the border mean, area-average
to 8x8, scale to 0..16, then the same TorchScript model in-process, softmax, top-k."""
import io

import numpy as np
import torch
from PIL import Image


def area_weights(n_in, n_out):
    """(n_out, n_in) matrix: overlap of each output cell with each input pixel over the
    cell's length."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        lo, hi = o * scale, (o + 1) * scale
        for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            overlap = min(hi, i + 1.0) - max(lo, float(i))
            if overlap > 0:
                w[o, i] = overlap / scale
    return w


def preprocess(image_bytes, size=8, max_value=16.0):
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    rgb = np.asarray(img, dtype=np.float64)
    grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    h, w = grey.shape
    border = np.concatenate([grey[0, :], grey[-1, :], grey[1:-1, 0], grey[1:-1, -1]]) if h > 1 and w > 1 else grey.ravel()
    if border.mean() > 127.5:
        grey = 255.0 - grey
    out = area_weights(h, size) @ grey @ area_weights(w, size).T
    return (out * max_value / 255.0).astype(np.float32)


class Reference:
    def __init__(self, model_path, labels):
        self.model = torch.jit.load(model_path)
        self.model.eval()
        self.labels = labels

    def predict(self, image_bytes, k=3):
        x = torch.from_numpy(preprocess(image_bytes)).reshape(1, 1, 8, 8)
        with torch.no_grad():
            scores = torch.softmax(self.model(x)[0], 0).numpy()
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.labels[i], float(scores[i])) for i in order]
