import json

import numpy as np
import pytest

from torchship.errors import BadRequest
from torchship.serve.protocol import decode_inputs, encode_outputs, metadata, split_body
from torchship.spec import IOSpec

SPEC = IOSpec(IOSpec.parse(["x:float32[batch,3]", "ids:int64[batch,seq]"]).inputs, IOSpec.parse(["y:float32[batch,3]"]).inputs)


def test_metadata_marks_dynamic_dims():
    m = metadata("m", ["1"], "torchship_onnxrt", SPEC)
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}, {"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]


def test_json_and_binary_inputs_decode_alike():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[1, 2], [3, 4]], np.int64)
    as_json = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[0, 1, 2], [3, 4, 5]]},
                          {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
                                  {"name": "ids", "shape": [2, 2], "datatype": "INT64", "parameters": {"binary_data_size": 32}}]}).encode()
    body = head + x.tobytes() + ids.tobytes()
    for feeds in (decode_inputs(*split_body(json.dumps(as_json).encode(), None), SPEC),
                  decode_inputs(*split_body(body, str(len(head))), SPEC)):
        np.testing.assert_array_equal(feeds["x"], x)
        np.testing.assert_array_equal(feeds["ids"], ids)


@pytest.mark.parametrize("inputs, fragment", [
    ([{"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], "unknown input 'z'"),
    ([{"name": "x", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}], "datatype INT64 does not match the model's FP32"),
    ([{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}], "3 values do not fill shape [2, 3]"),
    ([{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a", "b", "c"]}], "data is not FP32"),
    ([{"name": "x", "shape": [1, 3], "datatype": "FP32"}], "neither 'data' nor binary_data_size"),
    ([{"name": "x", "shape": "1,3", "datatype": "FP32", "data": [1, 2, 3]}], "shape must be a list"),
    ([{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}] * 2, "given twice"),
])
def test_bad_inputs_say_what_is_wrong(inputs, fragment):
    with pytest.raises(BadRequest, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        decode_inputs({"inputs": inputs}, b"", SPEC)


def test_binary_size_mismatch_and_leftover_bytes():
    head = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    with pytest.raises(BadRequest, match="binary_data_size 8 does not fit"):
        decode_inputs(head, b"\0" * 12, SPEC)
    head["inputs"][0]["parameters"]["binary_data_size"] = 12
    with pytest.raises(BadRequest, match="4 bytes of binary data are not claimed"):
        decode_inputs(head, b"\0" * 16, SPEC)
    with pytest.raises(BadRequest, match="not valid JSON"):
        split_body(b"{nope", None)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length is 99"):
        split_body(b"{}", "99")


def test_outputs_json_or_binary_as_asked():
    y = np.ones((2, 3), np.float32)
    body, headers = encode_outputs({"id": "r1"}, {"y": y}, "m", "1")
    assert json.loads(body) == {"model_name": "m", "model_version": "1", "id": "r1",
                                "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [1.0] * 6}]}
    body, headers = encode_outputs({"outputs": [{"name": "y", "parameters": {"binary_data": True}}]}, {"y": y}, "m", "1")
    n = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:n])["outputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_array_equal(np.frombuffer(body[n:], np.float32).reshape(2, 3), y)
    with pytest.raises(BadRequest, match="unknown output"):
        encode_outputs({"outputs": [{"name": "q"}]}, {"y": y}, "m", "1")
