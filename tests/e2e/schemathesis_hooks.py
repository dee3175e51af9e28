"""schemathesis hooks for tests/e2e/test_openapi.py (SCHEMATHESIS_HOOKS=schemathesis_hooks).

A bundle is a gzip'd tar that no schema can generate, so every second upload case that
schemathesis draws sends one of a few real bundles instead (NNSERVE_ST_BUNDLES: a
directory of `<model>-<version>.tar.gz`): the upload then succeeds, and the stateful
phase follows the document's links from it (status, :predict, v2 infer and ready of the
new version, then its delete)."""
import itertools
import os

import schemathesis

UPLOAD = "POST /v1/models/{model}/versions"


def _archives():
    folder = os.environ.get("NNSERVE_ST_BUNDLES")
    if not folder:
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        model = name.rsplit("-", 1)[0]
        with open(os.path.join(folder, name), "rb") as f:
            out.append((model, f.read()))
    return out


ARCHIVES = _archives()
_turn = itertools.count()


@schemathesis.hook
def map_case(ctx, case):
    if not ARCHIVES or ctx.operation is None or ctx.operation.label != UPLOAD:
        return case
    n = next(_turn)
    if n % 2:
        return case
    model, archive = ARCHIVES[(n // 2) % len(ARCHIVES)]
    case.path_parameters = {"model": model}
    case.body = archive
    return case
