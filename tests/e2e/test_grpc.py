"""gRPC: Triton's own client (`tritonclient[grpc]`, unchanged, with its defaults) against
nnserve's KServe v2 service, the standard health service, and the errors a gRPC client
gets. The session server listens for gRPC too (conftest); the repository and management
tests start their own server with a token."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import requests

from conftest import EXAMPLES, ROOT, self_signed_cert, start_server, stop_server
from test_digits import encode, held_out, render  # noqa: F401  (fixture)
from test_tensor_api import rows, torch_mlp  # noqa: F401  (fixture)

if os.environ.get("CI"):
    import tritonclient.grpc as triton
    from tritonclient.grpc import service_pb2 as pb, model_config_pb2
else:
    triton = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2 as pb, model_config_pb2

from google.protobuf import descriptor_pb2
from tritonclient.utils import InferenceServerException

SERVICE = "/inference.GRPCInferenceService/"


def client(server):
    return triton.InferenceServerClient(server.grpc)


def raw_call(server, method, body, metadata=(), timeout=30):
    """Calls `method` with `body` as the message bytes, as any gRPC client would."""
    with grpc.insecure_channel(server.grpc) as ch:
        call = ch.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        return call(body, metadata=metadata, timeout=timeout)


def expect_error(code, fn, *args, **kwargs):
    with pytest.raises(InferenceServerException) as e:
        fn(*args, **kwargs)
    assert e.value.status() == f"StatusCode.{code}", e.value
    return e.value.message()


def test_our_proto_matches_tritonclients():
    """Every message, field and RPC of proto/inference.proto has the name, number and
    type that tritonclient's own descriptors give (a wrong number would pass our tests
    and break every real client)."""
    found = sorted(glob.glob(os.path.join(ROOT, "target", "release", "build", "nnserve-*", "out",
                                          "descriptors.bin")), key=os.path.getmtime)
    assert found, "the build writes descriptors.bin (host/build.rs)"
    fds = descriptor_pb2.FileDescriptorSet.FromString(open(found[-1], "rb").read())
    (ours,) = [f for f in fds.file if f.name == "inference.proto"]
    assert ours.package == "inference"
    theirs = {**pb.DESCRIPTOR.message_types_by_name, **model_config_pb2.DESCRIPTOR.message_types_by_name}

    def check(msg, their):
        assert their is not None, msg.name
        for f in msg.field:
            t = their.fields_by_name.get(f.name)
            assert t is not None, f"{msg.name}.{f.name} is not Triton's"
            repeated = t.is_repeated() if callable(t.is_repeated) else t.is_repeated
            assert (f.number, f.type, f.label == f.LABEL_REPEATED) == (t.number, t.type, repeated), \
                f"{msg.name}.{f.name}"
        for n in msg.nested_type:
            if not n.options.map_entry:
                check(n, their.nested_types_by_name.get(n.name))

    for msg in ours.message_type:
        check(msg, theirs.get(msg.name))
    their_enum = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    ours_enum = next(e for e in ours.enum_type if e.name == "DataType")
    assert {(v.name, v.number) for v in ours_enum.value} == \
        {(v.name, v.number) for v in their_enum.values}
    their_rpcs = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert ours.service[0].name == "GRPCInferenceService"
    for m in ours.service[0].method:
        t = their_rpcs[m.name]
        assert (m.input_type, m.output_type) == ("." + t.input_type.full_name, "." + t.output_type.full_name)
    assert len(ours.service[0].method) >= 11


@pytest.mark.parametrize("n", [1, 9])
def test_tritonclient_grpc_with_its_defaults(server, torch_mlp, n):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("mlp") and not c.is_model_ready("no-such-model")
    x = rows(n, seed=5)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = c.infer("mlp", [inp], outputs=[triton.InferRequestedOutput("output")],
                     request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("output"), torch_mlp(x), atol=1e-5)
    resp = result.get_response()
    assert resp.id == "req-7" and resp.model_name == "mlp" and resp.model_version == "1"
    # No outputs named: all of them; a version named: that one.
    result = c.infer("mlp", [inp], model_version="1")
    np.testing.assert_allclose(result.as_numpy("output"), torch_mlp(x), atol=1e-5)


def test_typed_contents_give_the_same_answer_as_raw(server, torch_mlp):
    """KServe's clients may send typed lists instead of raw bytes."""
    x = rows(2, seed=8)
    req = pb.ModelInferRequest(model_name="mlp", id="typed")
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    t.contents.fp32_contents.extend(x.flatten().tolist())
    resp = pb.ModelInferResponse.FromString(raw_call(server, "ModelInfer", req.SerializeToString()))
    assert resp.id == "typed" and resp.outputs[0].shape == [2, 3]
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(got, torch_mlp(x), atol=1e-5)


def test_metadata_config_and_statistics(server):
    c = client(server)
    meta = c.get_model_metadata("mlp")
    assert meta.name == "mlp" and meta.platform == "pytorch_libtorch" and meta.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 4])]
    config = c.get_model_config("mlp").config
    # mlp batches (bundle.toml [batching]): Triton's dims leave out the batch dimension.
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [4]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert config.output[0].name == "output" and list(config.output[0].dims) == [3]
    assert list(config.dynamic_batching.preferred_batch_size)
    server_meta = c.get_server_metadata()
    assert server_meta.name == "nnserve" and "statistics" in server_meta.extensions

    def stats():
        (s,) = c.get_inference_statistics("mlp").model_stats
        return s
    before = stats()
    x = rows(3, seed=1)
    inp = triton.InferInput("input", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    c.infer("mlp", [inp])
    after = stats()
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_count >= before.inference_count + 3
    assert after.execution_count >= before.execution_count + 1
    assert after.last_inference >= before.last_inference > 0
    assert after.inference_stats.compute_infer.count >= 1
    every = c.get_inference_statistics().model_stats
    assert {"mlp", "digits"} <= {s.name for s in every}
    expect_error("NOT_FOUND", c.get_model_config, "no-such-model")


def test_digits_through_one_bytes_input_answers_as_over_http(server, held_out):
    """A bundle with a handler plugin is called with the request body as one BYTES
    element and answers its body as the BYTES output `body` (docs/grpc.md)."""
    x, _ = held_out
    c = client(server)
    for i in range(6):
        body = encode(render(x[i], i), "PNG")
        over_http = requests.post(f"{server.url}/v1/models/digits:infer", data=body,
                                  headers={"content-type": "application/octet-stream"})
        assert over_http.status_code == 200
        inp = triton.InferInput("request", [1], "BYTES")
        inp.set_data_from_numpy(np.array([body], dtype=np.object_))
        result = c.infer("digits", [inp])
        (answer,) = result.as_numpy("body")
        assert answer == over_http.content
        out = result.get_response().outputs[0]
        assert out.parameters["content_type"].string_param.startswith("application/json")
    # Not an image: the plugin's 400 is INVALID_ARGUMENT with its message.
    inp = triton.InferInput("request", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    msg = expect_error("INVALID_ARGUMENT", c.infer, "digits", [inp])
    assert "PNG or JPEG" in msg


def test_errors_have_their_codes_and_the_server_keeps_serving(server, torch_mlp):
    c = client(server)
    x = rows(1, seed=2)
    good = triton.InferInput("input", [1, 4], "FP32")
    good.set_data_from_numpy(x)
    msg = expect_error("NOT_FOUND", c.infer, "no-such-model", [good])
    assert "no-such-model" in msg
    wrong_dtype = triton.InferInput("input", [1, 4], "FP64")
    wrong_dtype.set_data_from_numpy(x.astype(np.float64))
    msg = expect_error("INVALID_ARGUMENT", c.infer, "mlp", [wrong_dtype])
    assert "FP64" in msg or "fp64" in msg
    wrong_shape = triton.InferInput("input", [1, 5], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 5), np.float32))
    expect_error("INVALID_ARGUMENT", c.infer, "mlp", [wrong_shape])
    # Raw bytes that disagree with the shape.
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(b"\0" * 15)
    with pytest.raises(grpc.RpcError) as e:
        raw_call(server, "ModelInfer", req.SerializeToString())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 16 raw bytes, not 15" in e.value.details()
    # Not a protobuf at all: gRPC's code for a message that does not parse.
    with pytest.raises(grpc.RpcError) as e:
        raw_call(server, "ModelInfer", b"\xff\xff\xff\xff not protobuf")
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "decode" in e.value.details()
    # A bad name never reaches the registry.
    expect_error("INVALID_ARGUMENT", c.infer, "../etc", [good])
    # An RPC nnserve does not serve.
    with pytest.raises(grpc.RpcError) as e:
        raw_call(server, "CudaSharedMemoryStatus", b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    result = c.infer("mlp", [good])
    np.testing.assert_allclose(result.as_numpy("output"), torch_mlp(x), atol=1e-5)


def test_grpc_timeout_is_the_requests_deadline(server):
    """`gate` holds a request for as long as its input asks (conftest): a client's
    deadline shorter than that ends the call with DEADLINE_EXCEEDED."""
    c = client(server)
    hold = triton.InferInput("x", [1, 1], "FP32")
    hold.set_data_from_numpy(np.array([[1000.0]], np.float32))
    msg = expect_error("DEADLINE_EXCEEDED", c.infer, "gate", [hold], client_timeout=0.2)
    assert msg


def test_metrics_count_grpc_calls_by_protocol(server):
    def grpc_ok():
        text = requests.get(f"{server.url}/metrics").text
        for line in text.splitlines():
            if line.startswith("nnserve_api_requests_total{") and 'protocol="grpc"' in line \
                    and 'outcome="ok"' in line:
                return float(line.split()[-1])
        return 0.0
    before = grpc_ok()
    client(server).is_server_live()
    assert grpc_ok() == before + 1


# --- health ------------------------------------------------------------------------

HEALTH = "/grpc.health.v1.Health/"
SERVING, NOT_SERVING = 1, 2


def health_request(service):
    data = service.encode()
    return b"\x0a" + bytes([len(data)]) + data if data else b""


def health_status(answer):
    # HealthCheckResponse { ServingStatus status = 1; }: absent is UNKNOWN (0).
    return answer[1] if answer[:1] == b"\x08" else 0


def check(server, service):
    with grpc.insecure_channel(server.grpc) as ch:
        call = ch.unary_unary(HEALTH + "Check", request_serializer=None, response_deserializer=None)
        return health_status(call(health_request(service), timeout=10))


def test_server_reflection_lists_the_services(server):
    """grpcurl and other tools discover the services by reflection (v1)."""
    with grpc.insecure_channel(server.grpc) as ch:
        info = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                request_serializer=None, response_deserializer=None)
        # ServerReflectionRequest { list_services = 7: "" }
        (answer,) = list(info(iter([b"\x3a\x00"]), timeout=10))
        assert b"inference.GRPCInferenceService" in answer and b"grpc.health.v1.Health" in answer
        # file_containing_symbol = 4: the file that declares ModelInfer's message.
        symbol = b"inference.ModelInferRequest"
        (answer,) = list(info(iter([b"\x22" + bytes([len(symbol)]) + symbol]), timeout=10))
        assert b"raw_input_contents" in answer


# --- a server of our own, with a token and a small message limit -----------------

@pytest.fixture(scope="module")
def managed(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("grpc"))
    repo = os.path.join(tmp, "repository")
    for model in ("mlp", "mlp-a", "mlp-b", "mlp-ab"):
        shutil.copytree(os.path.join(EXAMPLES, model), os.path.join(repo, model))
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write("s3cret-token\n")
    config = os.path.join(tmp, "server.toml")
    with open(config, "w") as f:
        f.write("max_request_bytes = 65536\n")
    s = start_server(repo, tmp, "--admin-token-file", token, "--config", config,
                     "--grpc-listen", "127.0.0.1:0")
    yield s
    stop_server(s)
    assert s.proc.returncode == 0, s.log()


AUTH = {"authorization": "Bearer s3cret-token"}


def test_repository_calls_need_the_token_and_health_follows_the_model(managed):
    c = client(managed)
    msg = expect_error("UNAUTHENTICATED", c.get_model_repository_index)
    assert "Bearer" in msg
    expect_error("UNAUTHENTICATED", c.unload_model, "mlp", headers={"authorization": "Bearer nope"})
    assert c.is_model_ready("mlp")
    index = c.get_model_repository_index(headers=AUTH)
    assert {(m.name, m.state) for m in index.models} >= {("mlp", "READY"), ("mlp-a", "READY")}

    assert check(managed, "") == SERVING
    assert check(managed, "mlp") == SERVING
    with grpc.insecure_channel(managed.grpc) as ch:
        watch = ch.unary_stream(HEALTH + "Watch", request_serializer=None, response_deserializer=None)
        stream = watch(health_request("mlp"), timeout=60)
        assert health_status(next(stream)) == SERVING
        c.unload_model("mlp", headers=AUTH)
        # The watcher hears the change without asking again.
        assert health_status(next(stream)) == NOT_SERVING
        stream.cancel()
    assert check(managed, "mlp") == NOT_SERVING
    assert not c.is_model_ready("mlp")
    expect_error("UNAVAILABLE", c.infer, "mlp", [zeros()])
    c.load_model("mlp", headers=AUTH)
    assert check(managed, "mlp") == SERVING and c.is_model_ready("mlp")
    with pytest.raises(grpc.RpcError) as e:
        check(managed, "no-such-model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def zeros(rows_=1):
    inp = triton.InferInput("input", [rows_, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((rows_, 4), np.float32))
    return inp


def test_an_oversized_message_is_refused_and_the_next_call_served(managed):
    c = client(managed)
    msg = expect_error("RESOURCE_EXHAUSTED", c.infer, "mlp", [zeros(5000)])
    assert "65536" in msg
    assert c.infer("mlp", [zeros()]).as_numpy("output").shape == (1, 3)


def test_an_endpoint_routes_grpc_calls_and_names_the_variant(managed):
    c = client(managed)
    seen = set()
    for _ in range(20):
        with grpc.insecure_channel(managed.grpc) as ch:
            req = pb.ModelInferRequest(model_name="mlp-ab")
            req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
            req.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
            call = ch.unary_unary(SERVICE + "ModelInfer", request_serializer=None,
                                  response_deserializer=None)
            _, meta = call.with_call(req.SerializeToString(), timeout=30)
            seen.add(dict(meta.initial_metadata())["x-nnserve-variant"])
    assert seen <= {"mlp-a@1", "mlp-b@1"} and seen
    assert c.get_model_metadata("mlp-ab").name in {"mlp-a", "mlp-b"}


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
import kserve

async def run(url, x):
    c = kserve.InferenceGRPCClient(url)
    out = {"ready": await c.is_server_ready() and await c.is_model_ready("mlp")}
    try:
        for binary in (False, True):
            inp = kserve.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            r = await c.infer(kserve.InferRequest(model_name="mlp", infer_inputs=[inp],
                                                  request_id=f"k{binary}"))
            out[str(binary)] = {"id": r.id, "y": r.outputs[0].as_numpy().tolist()}
    finally:
        await c.close()
    return out

x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
print(json.dumps(asyncio.run(run(sys.argv[1], x))))
"""


def test_kserves_own_grpc_client(server, torch_mlp):
    """KServe's InferenceGRPCClient (PyPI `kserve`), with typed contents and with raw. In
    its own process: its protos and tritonclient's both define package `inference`, which
    one protobuf descriptor pool refuses to hold twice."""
    import json
    import subprocess
    import sys
    import importlib.util
    if importlib.util.find_spec("kserve") is None:
        # In CI a missing client is a failure, not a skip (make test installs it).
        assert not os.environ.get("CI"), "kserve is not installed"
        pytest.skip("kserve is not installed")
    x = rows(3, seed=11)
    out = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, server.grpc, json.dumps(x.tolist())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ready"]
    for binary in ("False", "True"):
        assert got[binary]["id"] == f"k{binary}"
        np.testing.assert_allclose(np.array(got[binary]["y"]), torch_mlp(x), atol=1e-5)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is missing (make setup installs it)")
def test_grpc_over_tls_with_the_servers_certificate(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(EXAMPLES, "mlp"), repo / "mlp")
    s = start_server(str(repo), str(tmp_path), "--tls-cert", str(cert), "--tls-key", str(key),
                     "--grpc-listen", "127.0.0.1:0")
    try:
        c = triton.InferenceServerClient(s.grpc, ssl=True, root_certificates=str(cert))
        assert c.is_model_ready("mlp")
        assert c.infer("mlp", [zeros()]).as_numpy("output").shape == (1, 3)
        # Plain text to a TLS listener, and TLS with an unknown certificate, both fail.
        with pytest.raises(InferenceServerException):
            triton.InferenceServerClient(s.grpc).is_server_live(client_timeout=5)
        with pytest.raises(InferenceServerException):
            triton.InferenceServerClient(s.grpc, ssl=True).is_server_live(client_timeout=5)
    finally:
        stop_server(s)
    assert s.proc.returncode == 0, s.log()


def test_sigterm_lets_a_grpc_call_in_service_finish(tmp_path):
    """On SIGTERM a call whose forward is running gets its answer; then the server exits 0."""
    from conftest import write_bundle
    repo = tmp_path / "repo"
    d = write_bundle(str(repo), "gate", '{ name = "x", dtype = "fp32", shape = [-1, 1] }',
                     '{ name = "y", dtype = "fp32", shape = [-1, 1] }',
                     handler="[batching]\nmax_batch_size = 1\nnum_batch_threads = 1\n")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_gate.py"),
                    os.path.join(d, "model", "model.pt")], check=True)
    s = start_server(str(repo), str(tmp_path), "--grpc-listen", "127.0.0.1:0")
    try:
        c = triton.InferenceServerClient(s.grpc)
        hold = triton.InferInput("x", [1, 1], "FP32")
        hold.set_data_from_numpy(np.array([[800.0]], np.float32))
        done = []

        def forwards():
            (st,) = c.get_inference_statistics("gate").model_stats
            return st.inference_stats.queue.count  # counted when a forward begins
        before = forwards()
        c.async_infer("gate", [hold], callback=lambda result, error: done.append((result, error)))

        def forwarding():
            return forwards() > before
        deadline = time.time() + 30
        while not forwarding():
            assert time.time() < deadline, "the call never reached its forward"
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        assert s.proc.returncode == 0, s.log()
        deadline = time.time() + 10
        while not done:
            assert time.time() < deadline, "the callback never ran"
            time.sleep(0.01)  # polling a client-side callback, not ordering server events
        result, error = done[0]
        assert error is None, error
        assert result.as_numpy("y").tolist() == [[1600.0]]
    finally:
        if s.proc.poll() is None:
            stop_server(s)
