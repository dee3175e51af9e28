#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (small, committed): valid inputs
of each parser and the hostile shapes the hardening found by hand. Run it again after
changing a seed; the fuzzer adds its own finds beside these (`make fuzz` keeps them in
fuzz/corpus/, and those worth keeping are committed). Deterministic: fixed times, modes
and gzip mtime. The gRPC seeds need the venv's protobuf modules: `.venv/bin/python
fuzz/seeds.py`."""
import gzip
import io
import json
import os
import struct
import tarfile

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")
EXAMPLES = os.path.join(ROOT, "..", "examples", "repository")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def targz(entries):
    """entries: (name, kind, payload) with kind file/dir/symlink/hardlink."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
            info.linkname = payload or ""
            tar.addfile(info)
    return gzip.compress(raw.getvalue(), mtime=0)


MANIFEST = b"""[bundle]
name = "tiny"
version = 1

[model]
backend = "torchscript"
path = "model/model.pt"
inputs = [{ name = "x", dtype = "fp32", shape = [-1, 4] }]
outputs = [{ name = "y", dtype = "fp32", shape = [-1, 3] }]
"""


def archives():
    put("archive", "bundle.tar.gz", targz([("bundle.toml", "file", MANIFEST), ("model", "dir", None),
                                            ("model/model.pt", "file", b"PK\x03\x04 weights")]))
    put("archive", "wrapped.tar.gz", targz([("tiny-1", "dir", None), ("tiny-1/bundle.toml", "file", MANIFEST)]))
    put("archive", "symlink-inside.tar.gz", targz([("bundle.toml", "file", MANIFEST),
                                                    ("assets/a.txt", "file", b"a"),
                                                    ("assets/b.txt", "symlink", "a.txt")]))
    put("archive", "symlink-out.tar.gz", targz([("bundle.toml", "file", MANIFEST), ("esc", "symlink", "../../etc"),
                                                 ("esc/passwd", "file", b"x")]))
    put("archive", "dotdot.tar.gz", targz([("../evil", "file", b"x"), ("bundle.toml", "file", MANIFEST)]))
    put("archive", "hardlink.tar.gz", targz([("bundle.toml", "file", MANIFEST), ("h", "hardlink", "/etc/passwd")]))
    put("archive", "zeros.tar.gz", gzip.compress(bytes(64 << 10), mtime=0))
    put("archive", "not-gzip", b"PK\x03\x04 a zip, not a tar.gz")


def manifests():
    for name in ("mlp", "digits", "mlp-ab", "minilm"):
        with open(os.path.join(EXAMPLES, name, "1", "bundle.toml"), "rb") as f:
            put("manifest", f"{name}.toml", f.read())
    put("manifest", "tiny.toml", MANIFEST)
    put("manifest", "deps.toml", b'[bundle]\nname = "front"\nversion = 2\n[handler]\npath = "p.wasm"\n'
                                 b'dependencies = ["mlp", "enc@stable", "x@3"]\ninit = true\nconfig = { a = [1, 2], b = { c = "d" } }\n')
    put("manifest", "unknown-field.toml", b'[bundle]\nname = "x"\nversion = 1\nflavour = "odd"\n')
    put("manifest", "escape.toml", b'[bundle]\nname = "x"\nversion = 1\n[handler]\npath = "../../etc/passwd"\n')
    put("manifest", "huge-shape.toml", MANIFEST.replace(b"[-1, 4]", b"[-1, 4000000000000]"))


def tensors():
    dtypes = ["bool", "uint8", "int8", "int16", "int32", "int64", "fp16", "bf16", "fp32", "fp64"]
    pick = {d: bytes([i]) for i, d in enumerate(dtypes)}
    put("tensor_json", "fp32-rows", pick["fp32"] + b"[[1.0, 2.5, -3.0, 4e-7], [0, 1, 2, 3]]")
    put("tensor_json", "int64", pick["int64"] + json.dumps([[101, 2023, 102], [9007199254740993, -1, 0]]).encode())
    put("tensor_json", "bool", pick["bool"] + b"[true, false, true]")
    put("tensor_json", "uint8-out-of-range", pick["uint8"] + b"[0, 255, 256, -1]")
    put("tensor_json", "fp16", pick["fp16"] + b"[65504, 6e-8, 1e5]")
    put("tensor_json", "bf16", pick["bf16"] + b"[[3.4e38, 1.0]]")
    put("tensor_json", "fp64", pick["fp64"] + b"[1.7976931348623157e308, 5e-324, 0.1]")
    put("tensor_json", "ragged", pick["fp32"] + b"[[1, 2], [3]]")
    put("tensor_json", "scalar", pick["int32"] + b"7")
    put("tensor_json", "empty", pick["fp32"] + b"[[], []]")
    put("tensor_json", "deep", pick["int8"] + b"[" * 200 + b"1" + b"]" * 200)
    put("tensor_json", "strings", pick["fp32"] + b'["1.0", null, {"a": 1}]')


def binaries():
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    tail = struct.pack("<4f", 1, 2, 3, 4)
    put("binary", "one-input", struct.pack("<HH", len(head), 16) + head + tail)
    put("binary", "header-past-end", struct.pack("<HH", 60000, 4) + head)
    put("binary", "size-past-end", struct.pack("<HH", len(head), 60000) + head + tail)
    put("binary", "zero-size", struct.pack("<HH", 0, 0) + b"abc")


def url_targets():
    for i, path in enumerate(["mlp:predict", "mlp/versions/3:infer", "mlp/labels/stable:predict",
                              "mlp/versions/2/metadata", "ResNet50", "../versions/7", "mlp/labels/..",
                              "mlp/versions/18446744073709551615", "a\\b:predict", "mlp/bogus",
                              "mlp/metadata:predict", "x" * 300 + ":predict", "mlp/labels/a b"]):
        put("url_target", f"{i:02}", path.encode())


def predicts():
    one, two, image = b"\x00", b"\x01", b"\x02"
    put("tfserving_predict", "rows", one + b'{"instances": [[1.0, 2.0, 3.0, 4.0], [5, 6, 7, 8]]}')
    put("tfserving_predict", "columns", one + b'{"inputs": [[1.0, 2.0, 3.0, 4.0]]}')
    put("tfserving_predict", "named-rows", two + b'{"instances": [{"ids": [101, 7, 102], "mask": [true, true, true]}]}')
    put("tfserving_predict", "named-columns", two + b'{"inputs": {"ids": [[101, 102]], "mask": [[true, false]]}}')
    put("tfserving_predict", "unknown-input", two + b'{"instances": [{"ids": [1], "mask": [true], "extra": 1}]}')
    put("tfserving_predict", "both", one + b'{"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}')
    put("tfserving_predict", "image", image + json.dumps({"instances": [[[[1, 2, 3], [4, 5, 6]], [[-1, -2, -3], [127, -128, 0]]]]}).encode())
    put("tfserving_predict", "ragged-rows", two + b'{"instances": [{"ids": [1, 2], "mask": [true]}, {"ids": [1], "mask": [true]}]}')
    put("tfserving_predict", "not-an-object", one + b'[[1, 2, 3, 4]]')


def v2_requests():
    def body(head, tail=b""):
        h = json.dumps(head).encode()
        return struct.pack("<H", len(h) if tail or head.get("_binary") else 0) + h + tail
    row = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    put("v2_infer", "json", body({"id": "1", "inputs": [row]}))
    put("v2_infer", "two-inputs", body({"inputs": [{"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [[101, 7, 102]]},
                                                   {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [True, True, False]}],
                                        "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}))
    put("v2_infer", "binary", body({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                "parameters": {"binary_data_size": 16}}]}, struct.pack("<4f", 1, 2, 3, 4)))
    put("v2_infer", "leftover", body({"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32",
                                                  "parameters": {"binary_data_size": 4}}]}, bytes(12)))
    put("v2_infer", "twice", body({"inputs": [row, row]}))
    put("v2_infer", "wrong-count", body({"inputs": [dict(row, shape=[2, 4])]}))
    put("v2_infer", "huge-shape", body({"inputs": [dict(row, shape=[4294967296, 4294967296, 4])]}))
    put("v2_infer", "bytes", body({"inputs": [{"name": "request", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}))


def grpc_requests():
    """KServe's ModelInferRequest and TF Serving's PredictRequest, as their clients'
    own protobuf modules write them (tritonclient, tensorflow-serving-api: the venv's,
    so run this with .venv/bin/python)."""
    import numpy as np
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2
    from tritonclient.grpc import service_pb2 as kserve

    def infer(inputs, raw=()):
        r = kserve.ModelInferRequest(model_name="mlp", id="1")
        for name, dtype, shape, contents in inputs:
            i = r.inputs.add(name=name, datatype=dtype, shape=shape)
            if contents is not None:
                i.contents.CopyFrom(kserve.InferTensorContents(**contents))
        r.raw_input_contents.extend(raw)
        return r.SerializeToString()
    put("grpc_infer", "typed-fp32", infer([("input", "FP32", [1, 4], {"fp32_contents": [1, 2, 3, 4]})]))
    put("grpc_infer", "raw-fp32", infer([("input", "FP32", [1, 4], None)], [np.arange(4, dtype="<f4").tobytes()]))
    put("grpc_infer", "two-inputs", infer([("ids", "INT64", [1, 3], {"int64_contents": [101, 7, 102]}),
                                           ("mask", "BOOL", [1, 3], {"bool_contents": [True, True, False]})]))
    put("grpc_infer", "int8-out-of-range", infer([("x", "INT8", [2], {"int_contents": [1, 300]})]))
    put("grpc_infer", "raw-fp16", infer([("x", "FP16", [2], None)], [bytes(4)]))
    put("grpc_infer", "raw-count-mismatch", infer([("a", "FP32", [1], None), ("b", "FP32", [1], None)], [bytes(4)]))
    put("grpc_infer", "twice", infer([("x", "FP32", [1], {"fp32_contents": [1]})] * 2))
    put("grpc_infer", "huge-shape", infer([("x", "FP32", [4294967296, 4294967296, 4], None)], [bytes(4)]))
    put("grpc_infer", "bytes", infer([("request", "BYTES", [1], {"bytes_contents": [b"hello"]})]))

    def predict(inputs):
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "mlp"
        for name, dtype, shape, fields in inputs:
            r.inputs[name].CopyFrom(tensor_pb2.TensorProto(
                dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
                    dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]), **fields))
        return r.SerializeToString()
    put("tfserving_grpc", "float-list", predict([("input", types_pb2.DT_FLOAT, [1, 4], {"float_val": [1, 2, 3, 4]})]))
    put("tfserving_grpc", "content", predict([("input", types_pb2.DT_FLOAT, [1, 4],
                                                {"tensor_content": np.arange(4, dtype="<f4").tobytes()})]))
    put("tfserving_grpc", "fill", predict([("x", types_pb2.DT_INT32, [3, 3], {"int_val": [7]})]))
    put("tfserving_grpc", "fill-too-big", predict([("x", types_pb2.DT_DOUBLE, [1 << 20, 1 << 20], {"double_val": [1]})]))
    put("tfserving_grpc", "half", predict([("x", types_pb2.DT_HALF, [2], {"half_val": [15360, 0]})]))
    put("tfserving_grpc", "string", predict([("x", types_pb2.DT_STRING, [1], {"string_val": [b"hi"]})]))
    put("tfserving_grpc", "negative-dim", predict([("x", types_pb2.DT_FLOAT, [-1, 4], {"float_val": [1]})]))
    put("tfserving_grpc", "two-inputs", predict([("ids", types_pb2.DT_INT64, [1, 2], {"int64_val": [1, 2]}),
                                                 ("mask", types_pb2.DT_BOOL, [1, 2], {"bool_val": [True, False]})]))


def plugin_answers():
    """A handler plugin's answer head (status, then `\\x1e`-separated records: a header
    `name\\x1fvalue`, or the content type), which is also read as a BYTES tensor."""
    def head(status, *records):
        return struct.pack("<H", status) + "\x1e".join(records).encode()
    put("plugin_io", "ok", head(200, "x-a\x1f1", "text/plain"))
    put("plugin_io", "framing", head(200, "content-length\x1f5", "Transfer-Encoding\x1fchunked", "proxy-x\x1fy",
                                     "x-ok\x1fyes"))
    put("plugin_io", "status-101", head(101))
    put("plugin_io", "status-0", head(0, "application/json"))
    put("plugin_io", "bad-name", head(200, "bad name\x1fv"))
    put("plugin_io", "newline-value", head(200, "x\x1fa\nb"))
    put("plugin_io", "content-type-twice", head(200, "content-type\x1fa/b", "c/d"))
    put("plugin_io", "bytes-elements", struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0))
    put("plugin_io", "bytes-cut", struct.pack("<I", 9) + b"abc")


if __name__ == "__main__":
    plugin_answers()
    grpc_requests()
    v2_requests()
    predicts()
    url_targets()
    archives()
    manifests()
    tensors()
    binaries()
    total = sum(len(fs) for _, _, fs in os.walk(CORPUS))
    print(f"{total} seeds under {CORPUS}")
