"""TensorFlow SavedModels behind the same APIs as TorchScript: `tf-mlp` (the mlp example's
twin) answers as TensorFlow itself does in Python over `:predict`, KServe v2 JSON and
tritonclient's binary tensors; `digits-tf` (Keras, `model.export()`) answers through the
unchanged image-classifier plugin as TF does; a TF Serving directory without bundle.toml
and a model with two inputs and two outputs are served with the signature's names;
batched and unbatched answers agree; a broken SavedModel, a missing signature or a
manifest that disagrees with the signature fails to load with its reason while the other
models serve; a TF hot swap under load drops nothing."""
import os
import shutil
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

from conftest import EXAMPLES, start_server, stop_server  # noqa: E402

tf = pytest.importorskip("tensorflow") if not os.environ.get("CI") else __import__("tensorflow")
import make_tf_models  # noqa: E402  (examples/, on sys.path through conftest)

if os.environ.get("CI"):
    import tritonclient.http as triton
else:
    triton = pytest.importorskip("tritonclient.http")

TF_MLP = os.path.join(EXAMPLES, "tf-mlp", "1")
DIGITS_TF = os.path.join(EXAMPLES, "digits-tf", "1")


class TwoByTwo(tf.Module):
    """Two inputs of different dtypes, two outputs."""

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x"),
                                  tf.TensorSpec([None, 2], tf.int64, name="k")])
    def serve(self, x, k):
        return {"total": tf.reduce_sum(x, axis=1, keepdims=True) * 2.0,
                "shifted": k + 7}


def reference(saved_model, x):
    """TensorFlow's own answer, in this process."""
    f = tf.saved_model.load(saved_model).signatures["serving_default"]
    return f(input=tf.constant(x))["output"].numpy()


def rows(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def tf_bundle(repo, name, manifest_extra="", batching=True, saved_model=None, version=1):
    """A TF bundle `name` whose SavedModel is tf-mlp's (or `saved_model`)."""
    d = os.path.join(repo, name, str(version))
    shutil.copytree(saved_model or os.path.join(TF_MLP, "model", "saved_model"),
                    os.path.join(d, "model", "saved_model"))
    text = f'[bundle]\nname = "{name}"\nversion = {version}\n\n[model]\nbackend = "tensorflow"\n{manifest_extra}\n'
    if batching:
        text += "\n[batching]\nmax_batch_size = 64\nallowed_batch_sizes = [1, 2, 4, 8, 16, 32, 64]\n"
    with open(os.path.join(d, "bundle.toml"), "w") as f:
        f.write(text)
    return d


@pytest.fixture(scope="module")
def tfserver(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tf"))
    repo = os.path.join(tmp, "repo")
    shutil.copytree(TF_MLP, os.path.join(repo, "tf-mlp", "1"))
    shutil.copytree(os.path.join(EXAMPLES, "mlp"), os.path.join(repo, "mlp"))
    tf_bundle(repo, "tf-unbatched", batching=False)
    # Broken on purpose, each for one reason.
    corrupt = tf_bundle(repo, "tf-corrupt")
    with open(os.path.join(corrupt, "model", "saved_model", "saved_model.pb"), "wb") as f:
        f.write(b"\x0a\xff\xff not a SavedModel")
    tf_bundle(repo, "tf-nosig", 'signature = "classify"')
    tf_bundle(repo, "tf-disagree",
              'inputs = [{ name = "input", dtype = "fp32", shape = [-1, 5] }]\n'
              'outputs = [{ name = "output", dtype = "fp32", shape = [-1, 3] }]')
    tf_bundle(repo, "tf-misnamed",
              'inputs = [{ name = "x", dtype = "fp32", shape = [-1, 4] }]')
    # The Keras digits classifier behind the unchanged image-classifier plugin.
    shutil.copytree(DIGITS_TF, os.path.join(repo, "digits-tf", "1"))
    # As TF Serving users have them: <model>/<version>/saved_model.pb, no bundle.toml.
    shutil.copytree(os.path.join(TF_MLP, "model", "saved_model"), os.path.join(repo, "tfs-mlp", "3"))
    two = TwoByTwo()
    two_dir = os.path.join(tmp, "two-by-two")
    tf.saved_model.save(two, two_dir, signatures={"serving_default": two.serve})
    shutil.copytree(two_dir, os.path.join(repo, "two-by-two", "1"))
    s = start_server(repo, tmp)
    s.tmp, s.repo = tmp, repo
    yield s
    stop_server(s)


@pytest.mark.parametrize("n", [1, 5, 64, 100])
def test_predict_and_v2_json_answer_as_tensorflow_does(tfserver, n):
    x = rows(n, seed=n)
    want = reference(os.path.join(TF_MLP, "model", "saved_model"), x)
    r = requests.post(f"{tfserver.url}/v1/models/tf-mlp:predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["predictions"], dtype=np.float32), want, atol=1e-5)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = requests.post(f"{tfserver.url}/v2/models/tf-mlp/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "output" and out["shape"] == [n, 3]
    np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(n, 3), want, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_the_signature_and_gets_tensorflows_answer(tfserver, binary):
    client = triton.InferenceServerClient(tfserver.url.removeprefix("http://"))
    meta = client.get_model_metadata("tf-mlp")
    assert meta["platform"] == "tensorflow_savedmodel"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    x = rows(7, seed=11)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("tf-mlp", [inp], outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
    want = reference(os.path.join(TF_MLP, "model", "saved_model"), x)
    np.testing.assert_allclose(result.as_numpy("output"), want, atol=1e-5)


def test_batched_and_unbatched_answers_agree(tfserver):
    x = rows(24, seed=5)
    whole = requests.post(f"{tfserver.url}/v1/models/tf-unbatched:predict", json={"instances": x.tolist()})
    assert whole.status_code == 200, whole.text
    whole = np.array(whole.json()["predictions"], dtype=np.float32)
    answers = {}

    def one(i):
        with requests.Session() as s:
            r = s.post(f"{tfserver.url}/v1/models/tf-mlp:predict", json={"instances": [x[i].tolist()]})
            answers[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(x))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(code == 200 for code, _ in answers.values()), answers
    batched = np.array([answers[i][1]["predictions"][0] for i in range(len(x))], dtype=np.float32)
    np.testing.assert_allclose(batched, whole, atol=1e-6)


@pytest.mark.parametrize("name, reason", [
    ("tf-corrupt", "the SavedModel does not load"),
    ("tf-nosig", "has no signature 'classify'"),
    ("tf-disagree", "disagrees with the signature"),
    ("tf-misnamed", "are not the signature"),
])
def test_a_broken_tensorflow_bundle_fails_with_its_reason_and_the_others_serve(tfserver, name, reason):
    (status,) = requests.get(f"{tfserver.url}/v1/models/{name}").json()["model_version_status"]
    assert status["state"] == "END", status
    assert reason in status["status"]["error_message"], status
    r = requests.post(f"{tfserver.url}/v1/models/{name}:predict", json={"instances": [[1, 2, 3, 4]]})
    assert r.status_code == 503, r.text
    for ok in ("tf-mlp", "mlp"):
        r = requests.post(f"{tfserver.url}/v1/models/{ok}:predict", json={"instances": [[1, 2, 3, 4]]})
        assert r.status_code == 200, r.text


def test_a_tensorflow_hot_swap_under_load_drops_nothing(tfserver):
    from test_upload import pack
    tmp = tfserver.tmp
    v2 = os.path.join(tmp, "tf-mlp-2")
    make_tf_models.make_tf_mlp(os.path.join(v2, "model", "saved_model"), seed=1)
    with open(os.path.join(TF_MLP, "bundle.toml")) as f:
        text = f.read().replace("version = 1", "version = 2")
    with open(os.path.join(v2, "bundle.toml"), "w") as f:
        f.write(text)
    archive = pack(v2, os.path.join(tmp, "tf-mlp-2.tar.gz"))
    x = rows(1, seed=99)
    old = reference(os.path.join(TF_MLP, "model", "saved_model"), x)
    new = reference(os.path.join(v2, "model", "saved_model"), x)
    assert not np.allclose(old, new)
    stop, failures, seen = threading.Event(), [], []

    def client():
        deadline = time.time() + 60
        with requests.Session() as s:
            while not stop.is_set() and time.time() < deadline:
                r = s.post(f"{tfserver.url}/v1/models/tf-mlp:predict", json={"instances": x.tolist()})
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    seen.append(np.array(r.json()["predictions"], dtype=np.float32))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    r = requests.post(f"{tfserver.url}/v1/models/tf-mlp/versions", data=archive)
    assert r.status_code == 201 and r.json()["state"] == "AVAILABLE", r.text
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert failures == [], failures[:3]
    assert all(np.allclose(y, old, atol=1e-5) or np.allclose(y, new, atol=1e-5) for y in seen)
    assert np.allclose(seen[0], old, atol=1e-5) and np.allclose(seen[-1], new, atol=1e-5)


def test_a_tf_serving_directory_without_a_manifest_is_served(tfserver):
    x = rows(3, seed=8)
    r = requests.post(f"{tfserver.url}/v1/models/tfs-mlp:predict", json={"instances": x.tolist()})
    assert r.status_code == 200 and r.headers["x-nnserve-variant"] == "tfs-mlp@3", r.text
    want = reference(os.path.join(TF_MLP, "model", "saved_model"), x)
    np.testing.assert_allclose(np.array(r.json()["predictions"], dtype=np.float32), want, atol=1e-5)
    meta = requests.get(f"{tfserver.url}/v1/models/tfs-mlp/metadata").json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert list(sig["inputs"]) == ["input"] and list(sig["outputs"]) == ["output"], sig


def test_two_inputs_and_two_outputs_keep_the_signatures_names_and_dtypes(tfserver):
    x = np.array([[1, 2, 3], [0.5, 0, -1]], dtype=np.float32)
    k = np.array([[1, 2], [30, 40]], dtype=np.int64)
    body = {"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.ravel().tolist()},
        {"name": "k", "shape": [2, 2], "datatype": "INT64", "data": k.ravel().tolist()},
    ]}
    r = requests.post(f"{tfserver.url}/v2/models/two-by-two/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert set(out) == {"total", "shifted"}
    assert out["shifted"]["datatype"] == "INT64" and out["shifted"]["data"] == (k + 7).ravel().tolist()
    np.testing.assert_allclose(out["total"]["data"], (x.sum(1) * 2).tolist(), atol=1e-6)
    meta = requests.get(f"{tfserver.url}/v2/models/two-by-two").json()
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("k", "INT64"), ("x", "FP32")]
    # A dtype the signature does not take is refused with the input named.
    body["inputs"][1]["datatype"] = "FP32"
    r = requests.post(f"{tfserver.url}/v2/models/two-by-two/infer", json=body)
    assert r.status_code == 400 and "'k'" in r.text, r.text


class TfReference:
    """The image-classifier plugin's preprocessing in Python, then TF's own model."""

    def __init__(self, bundle):
        self.f = tf.saved_model.load(os.path.join(bundle, "model", "saved_model")).signatures["serving_default"]
        self.labels = open(os.path.join(bundle, "assets", "labels.txt")).read().split("\n")

    def predict(self, image_bytes, k=3):
        from reference import preprocess
        x = preprocess(image_bytes).reshape(1, 1, 8, 8)
        logits = self.f(input=tf.constant(x))["output_0"].numpy()[0].astype(np.float64)
        e = np.exp(logits - logits.max())
        scores = (e / e.sum()).astype(np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.labels[i], float(scores[i])) for i in order]


def test_digits_tf_through_the_unchanged_plugin_answers_as_tensorflow_does(tfserver):
    import digits_data
    from test_digits import encode, render
    (_, _), (x, y) = digits_data.split()
    ref = TfReference(DIGITS_TF)
    correct = jpeg_agree = 0
    with requests.Session() as http:
        def classify(body):
            r = http.post(f"{tfserver.url}/v1/models/digits-tf:infer", data=body,
                          headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            return [(p["label"], p["score"]) for p in r.json()["predictions"]]

        for i in range(len(x)):
            body = encode(render(x[i], i), "PNG")
            got, want = classify(body), ref.predict(body)
            assert [l for l, _ in got] == [l for l, _ in want], f"image {i}: {got} != {want}"
            np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4, atol=1e-5)
            correct += got[0][0] == str(y[i])
            jpeg = encode(render(x[i], i), "JPEG")
            jpeg_agree += classify(jpeg)[0][0] == ref.predict(jpeg)[0][0]
    assert correct / len(x) >= 0.9, correct / len(x)
    assert jpeg_agree / len(x) >= 0.99, f"JPEG top-1 agreement {jpeg_agree}/{len(x)}"


def test_packing_a_tf_serving_directory_says_it_needs_a_manifest(tmp_path):
    import subprocess
    from conftest import NNSERVE
    version = tmp_path / "half_plus_two" / "1"
    shutil.copytree(os.path.join(TF_MLP, "model", "saved_model"), version)
    r = subprocess.run([NNSERVE, "bundle", "pack", str(version), "-o", str(tmp_path / "x.tar.gz")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "without bundle.toml" in r.stderr and "bundle.toml" in r.stderr, r.stderr
    assert not (tmp_path / "x.tar.gz").exists()
