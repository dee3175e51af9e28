#!/usr/bin/env python3
"""Extracts the OpenAPI v3 schema of each version of a CustomResourceDefinition into
deploy/schemas/kserve/<kind>-<version>.json (kind in lower case), minified, for
tests/e2e/test_manifests.py. Repeat it after a KServe upgrade (deploy/schemas/README.md):

    python3 deploy/schemas/vendor.py CRD.yaml [CRD.yaml ...] [--out deploy/schemas/kserve]

A CRD path of the form REV:PATH is read with `git show` from the git directory in
$KSERVE_GIT_DIR (e.g. a bare clone of github.com/kserve/kserve), so

    KSERVE_GIT_DIR=/path/to/kserve.git python3 deploy/schemas/vendor.py \\
        HEAD:config/crd/full/serving.kserve.io_servingruntimes.yaml ...

needs no work tree. Only PyYAML is needed."""
import argparse
import json
import os
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def read_crd(path):
    if ":" in path and not os.path.exists(path):
        git_dir = os.environ.get("KSERVE_GIT_DIR")
        if not git_dir:
            sys.exit(f"{path}: a REV:PATH needs KSERVE_GIT_DIR")
        text = subprocess.run(["git", "--git-dir", git_dir, "show", path], check=True,
                              capture_output=True, text=True).stdout
    else:
        with open(path) as f:
            text = f.read()
    docs = [d for d in yaml.safe_load_all(text) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        sys.exit(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
    return crds[0]


def extract(crd, out_dir):
    """Writes one JSON file per served version; returns their paths."""
    kind = crd["spec"]["names"]["kind"]
    group = crd["spec"]["group"]
    written = []
    for v in crd["spec"]["versions"]:
        if not v.get("served", True):
            continue
        schema = v["schema"]["openAPIV3Schema"]
        # Which object this schema is for, kept beside it (the test picks the schema by it).
        schema["x-nnserve-vendored"] = {"apiVersion": f"{group}/{v['name']}", "kind": kind}
        path = os.path.join(out_dir, f"{kind.lower()}-{v['name']}.json")
        with open(path, "w") as f:
            json.dump(schema, f, separators=(",", ":"), sort_keys=True)
            f.write("\n")
        written.append(path)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("crds", nargs="+", help="CRD YAML files, or REV:PATH with KSERVE_GIT_DIR")
    ap.add_argument("--out", default=os.path.join(HERE, "kserve"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for p in args.crds:
        for w in extract(read_crd(p), args.out):
            print(f"{w} ({os.path.getsize(w)} bytes)")


if __name__ == "__main__":
    main()
