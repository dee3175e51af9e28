"""Models with several inputs and several outputs (a dict, a tuple) over both APIs."""
import numpy as np


A = [[1.0, 2.0], [3.0, -4.0]]
B = [2, -1]


def test_dict_outputs_are_named_by_their_keys(server, http):
    r = http.post(f"{server.url}/v1/models/dicty:predict", json={"inputs": {"a": A, "b": B}})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert sorted(out) == ["scaled", "total"]
    np.testing.assert_allclose(out["total"], [3.0, -1.0])
    np.testing.assert_allclose(out["scaled"], [[2.0, 4.0], [-3.0, 4.0]])


def test_tuple_outputs_take_the_manifest_names_in_rows(server, http):
    r = http.post(f"{server.url}/v1/models/tuply:predict",
                  json={"instances": [{"a": A[0], "b": B[0]}, {"a": A[1], "b": B[1]}]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [{"plus": [2.0, 3.0], "twice": 4}, {"plus": [4.0, -3.0], "twice": -2}]


def test_v2_with_two_inputs_of_different_dtypes(server, http):
    body = {"inputs": [
        {"name": "b", "shape": [2], "datatype": "INT64", "data": B},
        {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, -4]},
    ], "outputs": [{"name": "twice"}]}
    r = http.post(f"{server.url}/v2/models/tuply/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out == {"name": "twice", "datatype": "INT64", "shape": [2], "data": [4, -2]}


def test_a_missing_input_is_named(server, http):
    r = http.post(f"{server.url}/v2/models/tuply/infer",
                  json={"inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})
    assert r.status_code == 400 and "missing input 'b'" in r.json()["error"]
