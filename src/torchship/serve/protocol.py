"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension."""
from __future__ import annotations

import json
import math
from typing import Mapping

import numpy as np

from ..errors import BadRequest
from ..spec import IOSpec

TO_NUMPY = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT64": "int64", "INT32": "int32",
            "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
FROM_NUMPY = {v: k for k, v in TO_NUMPY.items()}
HEADER = "Inference-Header-Content-Length"


def datatype(dtype: str) -> str:
    return FROM_NUMPY.get(str(dtype), "FP32")


def metadata(name: str, versions: list[str], platform: str, spec: IOSpec) -> dict:
    def tensors(ts):
        return [{"name": t.name, "datatype": datatype(t.dtype), "shape": [d if isinstance(d, int) else -1 for d in t.shape]}
                for t in ts]
    return {"name": name, "versions": versions, "platform": platform,
            "inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs)}


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"{HEADER} is {n} but the body has {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        request = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")
    return request, rest


def decode_inputs(request: dict, binary: bytes, spec: IOSpec) -> dict[str, np.ndarray]:
    """Turn the request's inputs into arrays, checking names, datatypes, shapes and lengths."""
    feeds, offset = {}, 0
    expected = {t.name: t for t in spec.inputs}
    for inp in request["inputs"]:
        if not isinstance(inp, dict) or not {"name", "shape", "datatype"} <= set(inp):
            raise BadRequest("each input needs 'name', 'shape' and 'datatype'")
        name, dt = inp["name"], inp["datatype"]
        if name not in expected:
            raise BadRequest(f"unknown input {name!r}; the model takes {list(expected)}")
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        want = expected[name].dtype
        if TO_NUMPY.get(dt) != want:
            raise BadRequest(f"input {name!r}: datatype {dt} does not match the model's {datatype(want)}")
        shape = inp["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        count = math.prod(shape)
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            nbytes = count * np.dtype(want).itemsize
            if size != nbytes or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size} does not fit shape {shape} of "
                                 f"{dt} ({nbytes} bytes; {len(binary) - offset} bytes left in the body)")
            array = np.frombuffer(binary, dtype=want, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            if "data" not in inp:
                raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
            try:
                array = np.asarray(inp["data"], dtype=want)
            except (ValueError, TypeError) as exc:
                raise BadRequest(f"input {name!r}: data is not {dt}: {exc}") from None
            if array.size != count:
                raise BadRequest(f"input {name!r}: {array.size} values do not fill shape {shape} ({count} values)")
            array = array.reshape(shape)
        feeds[name] = array
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return feeds


def encode_outputs(request: dict, outputs: Mapping[str, np.ndarray], model: str, version: str) -> tuple[bytes, dict]:
    """The response body and extra headers; outputs go binary when the request asks for it."""
    asked = request.get("outputs")
    names = [o["name"] for o in asked] if asked else list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise BadRequest(f"unknown output(s) {unknown}; the model gives {list(outputs)}")
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    per = {o["name"]: (o.get("parameters") or {}).get("binary_data", default_binary) for o in asked or []}
    result, chunks = [], []
    for n in names:
        a = np.ascontiguousarray(outputs[n])
        entry = {"name": n, "datatype": datatype(a.dtype), "shape": list(a.shape)}
        if per.get(n, default_binary):
            raw = a.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = a.reshape(-1).tolist()
        result.append(entry)
    body = {"model_name": model, "model_version": version, "outputs": result}
    if "id" in request:
        body["id"] = request["id"]
    head = json.dumps(body).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {HEADER: str(len(head)), "content-type": "application/octet-stream"}
