"""TensorFlow SavedModels behind the same APIs as TorchScript: `tf-mlp` (the mlp example's
twin) answers as TensorFlow itself does in Python over `:predict`, KServe v2 JSON and
tritonclient's binary tensors; batched and unbatched answers agree; a broken SavedModel, a
missing signature or a manifest that disagrees with the signature fails to load with its
reason while the other models serve; a TF hot swap under load drops nothing."""
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
