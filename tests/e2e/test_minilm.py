"""A real pretrained model tokenised in Wasm: all-MiniLM-L6-v2 behind the text-embedder
plugin (examples/repository/minilm) gives the embeddings and token counts that
sentence-transformers gives on the same packaged model, alone and from concurrent
clients whose texts differ in length (batched across requests, padded per batch)."""
import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import EXAMPLES, start_server, stop_server

LONG = " ".join(f"Sentence number {i} talks about tokenisation, batching and padding." for i in range(40))
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café déjà vu: a naïve façade in Ångström-sized Straße.",
    "机器学习很有趣。東京は日本の首都です。한국어도 있어요.",
    "I love pizza 🍕🔥!! 😂😂 #yum",
    "Wait... what?!?! ---- ((really)) ;;; ¿¡no!?",
    "",
    LONG,
]


@pytest.fixture(scope="module")
def reference():
    """{text: (embedding, token count)} from sentence-transformers, in a process of its own
    (minilm_reference.py says why)."""
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "minilm_reference.py")],
                         input=json.dumps(TEXTS), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = json.loads(out.stdout)
    return {t: (np.array(e), n) for t, e, n in zip(TEXTS, ref["embeddings"], ref["tokens"])}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("minilm")
    repo = tmp / "repository"
    os.makedirs(repo / "minilm")
    # The exported bundle as it is (86 MiB): a symlinked version directory is served.
    os.symlink(os.path.join(EXAMPLES, "minilm", "1"), repo / "minilm" / "1")
    s = start_server(str(repo), str(tmp), "--grpc-listen", "127.0.0.1:0")
    yield s
    stop_server(s)


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embed(url, texts, session=requests):
    r = session.post(f"{url}/v1/models/minilm:infer", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_embeddings_and_token_counts_are_sentence_transformers_own(minilm, reference):
    assert reference[LONG][1] == 256, "the long text must be past the 256-token limit"
    answer = embed(minilm.url, TEXTS)
    assert answer["model"] == "all-MiniLM-L6-v2"
    assert len(answer["embeddings"]) == len(TEXTS) and len(answer["embeddings"][0]) == 384
    for text, got, n in zip(TEXTS, answer["embeddings"], answer["tokens"]):
        want, want_n = reference[text]
        assert n == want_n, (text[:40], n, want_n)
        assert cosine(got, want) >= 0.9999, (text[:40], cosine(got, want))
        assert abs(np.linalg.norm(got) - 1.0) < 1e-4
    one = minilm.url and requests.post(f"{minilm.url}/v1/models/minilm:infer",
                                       json={"text": TEXTS[0]}, timeout=60).json()
    assert one["tokens"] == [reference[TEXTS[0]][1]]
    assert cosine(one["embeddings"][0], reference[TEXTS[0]][0]) >= 0.9999


def batch_sizes(url):
    """The minilm version's batch-size histogram: (observations, sum of rows)."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "nnserve_batch_size":
            samples = {s.name: s.value for s in family.samples if s.labels.get("model") == "minilm"}
            return samples.get("nnserve_batch_size_count", 0), samples.get("nnserve_batch_size_sum", 0)
    return 0, 0


def test_concurrent_clients_of_different_lengths_share_batches_and_get_the_same_answers(minilm, reference):
    before = batch_sizes(minilm.url)
    texts = [t for t in TEXTS if t] * 2  # 12 texts of 6 lengths
    sent = 0

    def client(i):
        with requests.Session() as session:
            out = []
            for j in range(6):
                text = texts[(i + j) % len(texts)]
                out.append((text, embed(minilm.url, [text], session)))
            return out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for answers in pool.map(client, range(8)):
            for text, answer in answers:
                sent += 1
                want, want_n = reference[text]
                assert answer["tokens"] == [want_n]
                assert cosine(answer["embeddings"][0], want) >= 0.9999, (text[:40], cosine(answer["embeddings"][0], want))
    after = batch_sizes(minilm.url)
    batches, rows = after[0] - before[0], after[1] - before[1]
    assert rows == sent, (rows, sent)
    # Fewer forwards than requests: some batch held more than one request (of different
    # lengths: no two concurrent clients send the same text at once here).
    assert batches < sent, f"{sent} requests ran as {batches} batches: none was shared"


def test_bad_bodies_are_the_clients_400_with_what_to_send(minilm):
    for body in [{"texts": []}, {"words": ["x"]}, {"texts": "not a list"}, {"texts": ["x"] * 65}]:
        r = requests.post(f"{minilm.url}/v1/models/minilm:infer", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert "texts" in r.json()["error"], r.text


def test_grpc_clients_reach_the_plugin_through_one_bytes_input(minilm, reference):
    """KServe v2 over gRPC (Triton's own client): the JSON body as one BYTES element, the
    plugin's answer as the BYTES output `body` (docs/grpc.md)."""
    import tritonclient.grpc as triton

    c = triton.InferenceServerClient(minilm.grpc)
    texts = [TEXTS[1], TEXTS[2]]
    inp = triton.InferInput("request", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps({"texts": texts}).encode()], dtype=np.object_))
    (body,) = c.infer("minilm", [inp]).as_numpy("body")
    answer = json.loads(body)
    for text, got, n in zip(texts, answer["embeddings"], answer["tokens"]):
        assert n == reference[text][1]
        assert cosine(got, reference[text][0]) >= 0.9999
