#!/usr/bin/env python3
"""Make the compute-bound benchmark model: torchvision's ResNet-18 with seeded random
weights (nothing is downloaded), as TorchScript, in two bundles behind the
imagenet-classifier plugin, plus seeded JPEG test images and their torchvision answers.

  .venv/bin/python bench/make_resnet.py --out bench/work --plugin PATH/imagenet_classifier.wasm

Writes (all under --out, which is git-ignored):
  repository/resnet18/1/          batching on (max 8, no padding, no extra wait), the
                                  server's choice of num_batch_threads (one per core here)
  repository/resnet18-nobatch/1/  the same model, no [batching]
  repository/resnet18-bt1/1/      batching as resnet18 with num_batch_threads = 1: one
                                  forward at a time (with every core's libtorch thread)
      bundle.toml, model/model.pt, assets/labels.txt ("class 0".."class 999"),
      plugins/handler.wasm (a copy of --plugin)
  stub/imagenet-stub/1/           the same plugin in front of a stand-in model with the same
                                  input and output (it slices the input): the plugin's own
                                  cost, without ResNet's 40 ms forward to hide it
  image-256.jpg                   a seeded 256x256 JPEG (the load's request body)
  image-640x480.jpg               a seeded 640x480 JPEG (exercises the resize)
  image-256.input.bin             torchvision's preprocessed tensor of image-256.jpg (one
                                  [3,224,224] fp32 row, little-endian): the raw limit's input
  reference.json                  per image, the top-5 of torchvision's
                                  Resize(256) / CenterCrop(224) / ToTensor / Normalize on
                                  the PIL image, through the same TorchScript model

Does nothing for files that exist already unless --force (the model takes ~10 s)."""
import argparse
import json
import os
import shutil

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

MANIFEST = """# ResNet-18 (torchvision 0.28.0, seeded random weights) behind the imagenet-classifier
# plugin: POST JPEG or PNG bytes to /v1/models/{name}:infer. Made by bench/make_resnet.py.
[bundle]
name = "{name}"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
device = "auto"
inputs = [{{ name = "input", dtype = "fp32", shape = [-1, 3, 224, 224] }}]
outputs = [{{ name = "logits", dtype = "fp32", shape = [-1, 1000] }}]
{batching}
[handler]
path = "plugins/handler.wasm"   # built from plugins/imagenet-classifier
config = {{ top_k = "5", labels = "assets/labels.txt", resize = "256", crop = "224"{extra} }}
limits = {{ memory_mib = 64, cpu_ms = 200 }}
"""

# Compute-bound on a CPU: no padding (every allowed size up to 8: a padded row costs as
# much as a real one) and no extra wait for a fuller batch.
BATCHING = """
[batching]
max_batch_size = 8
batch_timeout_micros = 0
allowed_batch_sizes = [1, 2, 3, 4, 5, 6, 7, 8]
max_enqueued_batches = 64
{threads}"""

PREPROCESS = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


def make_model(path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    scripted = torch.jit.script(model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    scripted.save(tmp)
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


class Stub(torch.nn.Module):
    """[N, 3, 224, 224] -> [N, 1000]: the first 1000 input values, so the output still
    depends on the preprocessing, for a few microseconds of forward."""

    def forward(self, x):
        return x.flatten(1)[:, :1000].contiguous()


def make_image(path, width, height, seed):
    """A smooth seeded colour field with some grain: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def top5(model, image_path):
    x = PREPROCESS(Image.open(image_path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)[0]
    s, i = p.topk(5)
    return [{"label": f"class {int(c)}", "score": float(v)} for v, c in zip(s, i)]


def write_bundle(repo, name, batching, model_src, plugin, extra=""):
    """One bundle: the manifest, labels, a hard link to the model, a copy of the plugin."""
    d = os.path.join(repo, name, "1")
    os.makedirs(os.path.join(d, "model"), exist_ok=True)
    os.makedirs(os.path.join(d, "assets"), exist_ok=True)
    os.makedirs(os.path.join(d, "plugins"), exist_ok=True)
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(MANIFEST.format(name=name, batching=batching, extra=extra))
    with open(os.path.join(d, "assets", "labels.txt"), "w") as f:
        f.write("".join(f"class {i}\n" for i in range(1000)))
    model = os.path.join(d, "model", "model.pt")
    if os.path.abspath(model) != os.path.abspath(model_src):
        if os.path.exists(model):
            os.remove(model)
        os.link(model_src, model)
    if plugin:
        shutil.copyfile(plugin, os.path.join(d, "plugins", "handler.wasm"))
    print(f"wrote bundle {d}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "work"))
    ap.add_argument("--plugin", help="the built imagenet-classifier component (.wasm)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    repo = os.path.join(args.out, "repository")
    model_path = os.path.join(repo, "resnet18", "1", "model", "model.pt")
    if args.force or not os.path.exists(model_path):
        make_model(model_path)
    write_bundle(repo, "resnet18", BATCHING.format(threads=""), model_path, args.plugin)
    write_bundle(repo, "resnet18-bt1", BATCHING.format(threads="num_batch_threads = 1\n"), model_path,
                 args.plugin)
    # The bundle of the second session (two batch threads set by hand), no longer made.
    shutil.rmtree(os.path.join(repo, "resnet18-par2"), ignore_errors=True)
    write_bundle(repo, "resnet18-nobatch", "", model_path, args.plugin)
    stub_path = os.path.join(args.out, "stub", "imagenet-stub", "1", "model", "model.pt")
    if args.force or not os.path.exists(stub_path):
        os.makedirs(os.path.dirname(stub_path), exist_ok=True)
        torch.jit.script(Stub().eval()).save(stub_path)
    write_bundle(os.path.join(args.out, "stub"), "imagenet-stub", "", stub_path, args.plugin,
                 extra=', timing = "true"')

    images = {"image-256.jpg": (256, 256, 1), "image-640x480.jpg": (640, 480, 2)}
    for name, (w, h, seed) in images.items():
        path = os.path.join(args.out, name)
        if args.force or not os.path.exists(path):
            make_image(path, w, h, seed)
    # The tensor torchvision makes of the load's image: the raw limit forwards it
    # (`nnserve-bench raw` with NNSERVE_BENCH_INPUT) rather than zeros, which run faster.
    x = PREPROCESS(Image.open(os.path.join(args.out, "image-256.jpg")).convert("RGB"))
    x.contiguous().numpy().astype("<f4").tofile(os.path.join(args.out, "image-256.input.bin"))
    model = torch.jit.load(model_path).eval()
    reference = {name: top5(model, os.path.join(args.out, name)) for name in images}
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
    print(f"torchvision {torchvision.__version__}, torch {torch.__version__}; reference top-5: "
          + "; ".join(f"{n}: {r[0]['label']} {r[0]['score']:.4f}" for n, r in reference.items()))


if __name__ == "__main__":
    main()
