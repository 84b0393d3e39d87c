"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

A request is decoded and validated in one pass against one schema (``InferRequest``, msgspec): a field of the wrong
type or shape is a 400 that names it (``$.inputs[0].datatype``). Numbers go from the JSON straight into a typed list
and an array, with no generic parse first; responses are encoded by orjson from the arrays themselves.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Mapping

import msgspec
import numpy as np
import orjson

from ..errors import BadRequest, SpecError
from ..spec import IOSpec
from .raw import Decoded, RawInput, RawLimits, items, json_strings, serialize_bytes, split_bytes

TO_NUMPY = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT64": "int64", "INT32": "int32",
            "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
FROM_NUMPY = {v: k for k, v in TO_NUMPY.items()}
HEADER = "Inference-Header-Content-Length"

Dim = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]


class InputTensor(msgspec.Struct):
    name: str
    shape: list[Dim]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: msgspec.Raw = msgspec.Raw(b"")  # the JSON text of the values, decoded per datatype (b"": not given)


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(msgspec.Struct):
    inputs: list[InputTensor]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[RequestedOutput] | None = None


_REQUEST = msgspec.json.Decoder(InferRequest)
_VALUES = {"f": msgspec.json.Decoder(list[float]), "i": msgspec.json.Decoder(list[int]),
           "u": msgspec.json.Decoder(list[int]), "b": msgspec.json.Decoder(list[bool])}


_BY_DTYPE = {np.dtype(v): k for k, v in TO_NUMPY.items()}


def datatype(dtype: "str | np.dtype") -> str:
    """The protocol's name of a numpy dtype (or its name); a dict lookup: it runs for every output of every answer."""
    found = FROM_NUMPY.get(dtype) if isinstance(dtype, str) else _BY_DTYPE.get(dtype)
    return found or FROM_NUMPY.get(str(dtype), "FP32")


def metadata(name: str, versions: list[str], platform: str, spec: IOSpec, raw: RawInput | None = None,
             labels: bool = False) -> dict:
    """The model's metadata; ``raw``: the raw input the bundle also takes (a BYTES tensor, one string or encoded image
    an item), listed first: a client sends it or the tensors; ``labels``: a classifier's answer in its terms too."""
    def tensors(ts):
        return [{"name": t.name, "datatype": datatype(t.dtype), "shape": [d if isinstance(d, int) else -1 for d in t.shape]}
                for t in ts]
    first = [{"name": raw.name, "datatype": "BYTES", "shape": [-1]}] if raw else []
    named = [{"name": "label", "datatype": "BYTES", "shape": [-1]}, {"name": "score", "datatype": "FP32", "shape": [-1]}]
    return {"name": name, "versions": versions, "platform": platform,
            "inputs": first + tensors(spec.inputs), "outputs": tensors(spec.outputs) + (named if labels else [])}


def _bool(params: dict | None, key: str, where: str, default: bool = False) -> bool:
    value = (params or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where} parameter {key!r} must be true or false, got {value!r}")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
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
        request = _REQUEST.decode(head)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"the request does not fit the protocol: {exc}") from None
    except msgspec.DecodeError as exc:
        hint = "; NaN and Infinity are not JSON numbers" if b"NaN" in head or b"Infinity" in head else ""
        raise BadRequest(f"the request is not valid JSON: {exc}{hint}") from None
    except RecursionError:
        raise BadRequest("the request is nested too deeply to be a tensor") from None
    check_parameters(request)
    return request, rest


def check_parameters(request: InferRequest) -> None:
    """The parameters the protocol gives a meaning, each of its type (others are passed over)."""
    timeout = (request.parameters or {}).get("timeout")  # microseconds, as Triton's clients send it
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise BadRequest(f"parameter 'timeout' must be a positive number of microseconds, got {timeout!r}")
    _bool(request.parameters, "binary_data_output", "the request's")
    for i, inp in enumerate(request.inputs):
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise BadRequest(f"input {i} ({inp.name!r}): binary_data_size must be a non-negative integer, got {size!r}")
    for out in request.outputs or ():
        _bool(out.parameters, "binary_data", f"output {out.name!r}'s")


_PIECE = 1 << 20  # bytes of JSON numbers decoded at a time: bounded garbage, and the GIL let go between pieces
_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}  # the JSON values each array kind takes (no float -> int)


def _pieces(flat: bytes):
    """A flat JSON list's text, cut at commas into lists of about ``_PIECE`` bytes each."""
    start, end = 1, flat.rindex(b"]")
    while start < end:
        cut = flat.find(b",", start + _PIECE, end) if start + _PIECE < end else -1
        stop = end if cut == -1 else cut
        yield b"[" + flat[start:stop] + b"]"
        start = stop + 1


def _values(inp: InputTensor, dtype: np.dtype, count: int) -> np.ndarray:
    """The input's JSON values as an array of ``dtype``. A flat list (what clients send) goes piece by piece through
    a typed decoder straight into the array; nested lists (the protocol allows them) through a generic one."""
    raw = bytes(inp.data).strip()
    kind = np.dtype(dtype).kind
    if count > len(raw):  # every JSON value takes a byte at least: refused before anything is allocated for it
        given = raw.count(b",") + 1 if raw.strip(b"[] \t\r\n") else 0
        raise BadRequest(f"input {inp.name!r}: {given} values do not fill shape {inp.shape} ({count} values)")
    if raw[:1] != b"[" or raw.find(b"[", 1) != -1:
        return _nested(inp, raw, dtype, count)
    out, n = np.empty(count, dtype), 0
    for piece in _pieces(raw):
        try:
            values = _VALUES[kind].decode(piece)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"input {inp.name!r}: data is not {datatype(dtype)}: {exc}") from None
        if n + len(values) <= count:
            try:
                out[n:n + len(values)] = values
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadRequest(f"input {inp.name!r}: data is not {datatype(dtype)}: {str(exc)[:160]}") from None
        n += len(values)
    if n != count:
        raise BadRequest(f"input {inp.name!r}: {n} values do not fill shape {inp.shape} ({count} values)")
    return out


def _nested(inp: InputTensor, raw: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    try:
        values = msgspec.json.decode(raw)
    except RecursionError:
        raise BadRequest(f"input {inp.name!r}: data is nested too deeply") from None
    try:
        found = np.asarray(values)
        if found.dtype.kind not in _KINDS[np.dtype(dtype).kind]:
            raise TypeError(f"values of kind {found.dtype}")
        array = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"input {inp.name!r}: data is not {datatype(dtype)}: {str(exc)[:160]}") from None
    if array.size != count:
        raise BadRequest(f"input {inp.name!r}: {array.size} values do not fill shape {inp.shape} ({count} values)")
    return array


def decode_inputs(request: InferRequest, binary: bytes, spec: IOSpec, raw: RawInput | None = None,
                  limits: RawLimits = RawLimits()) -> tuple[dict[str, np.ndarray], list | None]:
    """Turn the request's inputs into arrays, checking names, datatypes, shapes and lengths; and the raw items, where
    the bundle takes raw input (``raw``) and the request gives it."""
    feeds, offset, found = {}, 0, None
    expected = spec.by_name
    for inp in request.inputs:
        name, dt = inp.name, inp.datatype
        if raw is not None and name == raw.name:
            found, offset = _raw(inp, binary, offset, found, raw, limits)
            continue
        if name not in expected:
            raise BadRequest(f"unknown input {name!r}; the model takes {([raw.name] if raw else []) + list(expected)}")
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        t = expected[name]
        want = t.np_dtype
        if TO_NUMPY.get(dt) != t.dtype:
            raise BadRequest(f"input {name!r}: datatype {dt} does not match the model's {datatype(want)}")
        count = math.prod(inp.shape)
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None:
            nbytes = count * want.itemsize
            if size != nbytes or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size} does not fit shape {inp.shape} of "
                                 f"{dt} ({nbytes} bytes; {len(binary) - offset} bytes left in the body)")
            array = np.frombuffer(binary, dtype=want, count=count, offset=offset).reshape(inp.shape)
            offset += size
        else:
            if not bytes(inp.data):
                raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
            array = _values(inp, want, count).reshape(inp.shape)
        feeds[name] = array
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    if found is not None and feeds:
        raise BadRequest(f"give either the raw input {raw.name!r} or the tensors {list(feeds)}, not both")
    return feeds, found


def _raw(inp: InputTensor, binary: bytes, offset: int, found, raw: RawInput, limits: RawLimits) -> tuple[list, int]:
    """A BYTES input of raw items: JSON strings, or Triton's binary form in the body's binary part."""
    if found is not None:
        raise BadRequest(f"input {inp.name!r} is given twice")
    if inp.datatype != "BYTES":
        raise BadRequest(f"input {inp.name!r} is {raw.kind}: its datatype is BYTES (one {raw.kind} an item), not "
                         f"{inp.datatype}")
    count = math.prod(inp.shape)
    size = (inp.parameters or {}).get("binary_data_size")
    if size is not None:
        if offset + size > len(binary):
            raise BadRequest(f"input {inp.name!r}: binary_data_size {size} is more than the {len(binary) - offset} "
                             "bytes left in the body")
        values = split_bytes(memoryview(binary)[offset:offset + size], count, inp.name)
        offset += size
    else:
        if not bytes(inp.data):
            raise BadRequest(f"input {inp.name!r} has neither 'data' nor binary_data_size")
        values = json_strings(bytes(inp.data), inp.name)
    return items(values, count, raw, limits), offset


def check_outputs(request, names: list[str]) -> None:
    """Requested outputs the model gives: refused before the model runs, not after (``request.outputs``: items
    with a ``name``, as HTTP and gRPC requests both have)."""
    unknown = [o.name for o in request.outputs or () if o.name not in names]
    if unknown:
        raise BadRequest(f"unknown output(s) {unknown}; the model gives {names}")


def encode_outputs(request: InferRequest, outputs: Mapping[str, np.ndarray], model: str, version: str) -> tuple[bytes, dict]:
    """The response body and extra headers; outputs go binary when the request asks for it. JSON data is written by
    orjson from the arrays (no Python lists in between)."""
    asked = request.outputs
    names = [o.name for o in asked] if asked else list(outputs)
    check_outputs(request, list(outputs))
    default_binary = _bool(request.parameters, "binary_data_output", "the request's")
    per = {o.name: _bool(o.parameters, "binary_data", f"output {o.name!r}'s", default_binary) for o in asked or []}
    result, chunks = [], []
    for n in names:
        a = np.ascontiguousarray(outputs[n])
        strings = a.dtype == object  # BYTES: a classifier's labels
        entry: dict[str, Any] = {"name": n, "datatype": "BYTES" if strings else datatype(a.dtype), "shape": list(a.shape)}
        if per.get(n, default_binary):
            raw = serialize_bytes(a) if strings else a.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = (a.reshape(-1).tolist() if strings else a.reshape(-1) if a.dtype != np.float16
                             else a.reshape(-1).astype(np.float32))
        result.append(entry)
    body = {"model_name": model, "model_version": version, "outputs": result}
    if request.id is not None:
        body["id"] = request.id
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {HEADER: str(len(head)), "content-type": "application/octet-stream"}


def decode_request(body: bytes, header_length: str | None, spec: IOSpec) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """``decode`` for a model that takes tensors only: (the request, its inputs)."""
    d = decode(body, header_length, spec)
    return d.request, d.feeds


def decode(body: bytes, header_length: str | None, spec: IOSpec, raw: RawInput | None = None,
           limits: RawLimits = RawLimits(), labels: bool = False) -> Decoded:
    """The whole check of one infer request against a model, before it is queued: structure, parameters, inputs
    (names, datatypes, shapes, values; or the raw items, where the bundle takes ``raw`` input), requested outputs
    (``label`` and ``score`` too for a classifier with ``labels``). Everything wrong in it is a ``BadRequest``."""
    request, binary = split_body(body, header_length)
    feeds, found = decode_inputs(request, binary, spec, raw, limits)
    if found is None:
        check_feeds(feeds, spec)
    check_outputs(request, spec.output_names + (["label", "score"] if labels else []))
    return Decoded(request, None if found is not None else feeds, found, deadline=timeout_s(request),
                   top_k=top_k(request.parameters))


def top_k(parameters: dict | None) -> int:
    """The request's 'top_k' parameter: how many labels (and scores) a classifier answers with, best first."""
    k = (parameters or {}).get("top_k", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise BadRequest(f"parameter 'top_k' must be an integer from 1 to 1000, got {k!r}")
    return k


def check_feeds(feeds: dict[str, np.ndarray], spec: IOSpec) -> None:
    """Decoded inputs the model can take: the spec's shapes, and no NaN or infinity."""
    try:
        spec.check(feeds)
    except SpecError as exc:
        raise BadRequest(str(exc)) from None
    bad = [k for k, v in feeds.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise BadRequest(f"input(s) {bad} hold NaN or infinite values, which the model cannot take")


def timeout_s(request: InferRequest) -> float | None:
    """The request's own deadline (its 'timeout' parameter, in microseconds), in seconds."""
    timeout = (request.parameters or {}).get("timeout")
    return timeout / 1e6 if timeout is not None else None
