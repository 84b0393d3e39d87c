import json

import numpy as np
import pytest

from torchship.errors import BadRequest
from torchship.serve import protocol
from torchship.serve.protocol import decode_request, encode_outputs, metadata, split_body, timeout_s
from torchship.spec import IOSpec

SPEC = IOSpec(IOSpec.parse(["x:float32[batch,3]"]).inputs, IOSpec.parse(["y:float32[batch,3]"]).inputs)
TWO = IOSpec(IOSpec.parse(["x:float32[batch,3]", "ids:int64[batch,seq]"]).inputs, SPEC.outputs)


def request(**fields) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], **fields}).encode()


def test_metadata_marks_dynamic_dims():
    m = metadata("m", ["1"], "torchship_onnxrt", TWO)
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}, {"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]


def test_json_and_binary_inputs_decode_alike():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[1, 2], [3, 4]], np.int64)
    as_json = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[0, 1, 2], [3, 4, 5]]},
                          {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
                                  {"name": "ids", "shape": [2, 2], "datatype": "INT64", "parameters": {"binary_data_size": 32}}]}).encode()
    for body, header in ((json.dumps(as_json).encode(), None), (head + x.tobytes() + ids.tobytes(), str(len(head)))):
        _, feeds = decode_request(body, header, TWO)
        np.testing.assert_array_equal(feeds["x"], x)
        np.testing.assert_array_equal(feeds["ids"], ids)
        assert feeds["ids"].dtype == np.int64


def test_a_long_flat_list_is_decoded_in_pieces_to_the_same_array(monkeypatch):
    monkeypatch.setattr(protocol, "_PIECE", 16)  # a piece every few numbers
    values = [float(i) / 7 for i in range(300)]
    big = IOSpec(IOSpec.parse(["x:float32[batch,300]"]).inputs, SPEC.outputs)
    _, feeds = decode_request(json.dumps({"inputs": [{"name": "x", "shape": [1, 300], "datatype": "FP32", "data": values}]}).encode(),
                              None, big)
    np.testing.assert_array_equal(feeds["x"][0], np.array(values, np.float32))
    with pytest.raises(BadRequest, match="299 values do not fill"):
        decode_request(json.dumps({"inputs": [{"name": "x", "shape": [1, 300], "datatype": "FP32", "data": values[:-1]}]}).encode(),
                       None, big)


X = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": [{**X, "name": "z"}]}, "unknown input 'z'"),
    ({"inputs": [{**X, "datatype": "INT64"}]}, "datatype INT64 does not match the model's FP32"),
    ({"inputs": [{**X, "shape": [2, 3]}]}, "3 values do not fill shape [2, 3]"),
    ({"inputs": [{**X, "data": ["a", "b", "c"]}]}, "data is not FP32"),
    ({"inputs": [{**X, "data": [1, 2, True]}]}, "data is not FP32"),
    ({"inputs": [{**X, "data": [[1, 2], "3"]}]}, "data is not FP32"),
    ({"inputs": [{**X, "data": {"a": 1}}]}, "data is not FP32"),
    ({"inputs": [{k: v for k, v in X.items() if k != "data"}]}, "neither 'data' nor binary_data_size"),
    ({"inputs": [{**X, "shape": "1,3"}]}, "at `$.inputs[0].shape`"),
    ({"inputs": [{**X, "shape": [1, True]}]}, "at `$.inputs[0].shape[1]`"),
    ({"inputs": [{**X, "shape": [1, -3]}]}, "at `$.inputs[0].shape[1]`"),
    ({"inputs": [{**X, "name": ["x"]}]}, "at `$.inputs[0].name`"),
    ({"inputs": [{**X, "datatype": {"t": "FP32"}}]}, "at `$.inputs[0].datatype`"),
    ({"inputs": [{**X, "parameters": [1]}]}, "at `$.inputs[0].parameters`"),
    ({"inputs": [X], "parameters": "fast"}, "at `$.parameters`"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": "binary"}]}, "at `$.outputs[0].parameters`"),
    ({"inputs": [X], "outputs": "y"}, "at `$.outputs`"),
    ({"inputs": [X], "outputs": ["y"]}, "at `$.outputs[0]`"),
    ({"inputs": [X], "outputs": [{}]}, "missing required field `name`"),
    ({"inputs": [X], "outputs": [{"name": "q"}]}, "unknown output(s) ['q']"),
    ({"inputs": [X], "parameters": {"timeout": "5"}}, "parameter 'timeout' must be a positive number"),
    ({"inputs": [X], "parameters": {"timeout": -1}}, "parameter 'timeout' must be a positive number"),
    ({"inputs": [X], "parameters": {"binary_data_output": "yes"}}, "'binary_data_output' must be true or false"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}, "'binary_data' must be true or false"),
    ({"inputs": [{**X, "parameters": {"binary_data_size": "12"}}]}, "binary_data_size must be a non-negative integer"),
    ({"inputs": [X, X]}, "given twice"),
    ({"inputs": "x"}, "at `$.inputs`"),
    ({}, "missing required field `inputs`"),
    ([1, 2], "Expected `object`"),
])
def test_bad_requests_say_what_is_wrong(body, fragment):
    with pytest.raises(BadRequest) as info:
        decode_request(json.dumps(body).encode(), None, SPEC)
    assert fragment in str(info.value)


@pytest.mark.parametrize("raw, fragment", [
    (b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}],"parameters":{"timeout":NaN}}', "not valid JSON"),
    (b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,' + b"9" * 400 + b']}]}', "data is not FP32"),
    (b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
     "nested too deeply"),
    (b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,1e400]}]}', "data is not FP32"),
    (b"{nope", "not valid JSON"),
])
def test_hostile_json_is_a_bad_request(raw, fragment):
    with pytest.raises(BadRequest, match=fragment):
        decode_request(raw, None, SPEC)


def test_integers_out_of_range_and_floats_for_integers_are_refused():
    ids = IOSpec(IOSpec.parse(["ids:int8[batch,3]"]).inputs, SPEC.outputs)
    for data in ([1, 2, 300], [1, 2, 3.5], [1, 2, int("9" * 400)]):
        with pytest.raises(BadRequest, match="data is not INT8"):
            decode_request(json.dumps({"inputs": [{"name": "ids", "shape": [1, 3], "datatype": "INT8", "data": data}]}).encode(),
                           None, ids)


def test_nan_and_infinity_are_refused_before_the_model_runs():
    x = np.array([[1, np.nan, 3]], np.float32)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}).encode()
    with pytest.raises(BadRequest, match="NaN or infinite"):
        decode_request(head + x.tobytes(), str(len(head)), SPEC)


def test_binary_size_mismatch_and_leftover_bytes():
    def head(size):
        return json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                       "parameters": {"binary_data_size": size}}]}).encode()
    with pytest.raises(BadRequest, match="binary_data_size 8 does not fit"):
        decode_request(head(8) + b"\0" * 12, str(len(head(8))), SPEC)
    with pytest.raises(BadRequest, match="4 bytes of binary data are not claimed"):
        decode_request(head(12) + b"\0" * 16, str(len(head(12))), SPEC)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length is 99"):
        split_body(b"{}", "99")
    with pytest.raises(BadRequest, match="must be an integer"):
        split_body(b"{}", "two")


def test_timeout_is_read_in_microseconds():
    req, _ = decode_request(request(parameters={"timeout": 25_000}), None, SPEC)
    assert timeout_s(req) == pytest.approx(0.025)
    assert timeout_s(decode_request(request(), None, SPEC)[0]) is None


def test_outputs_json_or_binary_as_asked():
    y = np.ones((2, 3), np.float32)
    req, _ = decode_request(request(id="r1"), None, SPEC)
    body, headers = encode_outputs(req, {"y": y}, "m", "1")
    assert json.loads(body) == {"model_name": "m", "model_version": "1", "id": "r1",
                                "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [1.0] * 6}]}
    req, _ = decode_request(request(outputs=[{"name": "y", "parameters": {"binary_data": True}}]), None, SPEC)
    body, headers = encode_outputs(req, {"y": y}, "m", "1")
    n = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:n])["outputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_array_equal(np.frombuffer(body[n:], np.float32).reshape(2, 3), y)
