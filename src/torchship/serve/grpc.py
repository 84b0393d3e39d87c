"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``, beside HTTP.

The same ``Server`` state answers both: the same models, batchers, limits, deadlines, metrics and admin token, and
the same messages. The service's messages and stubs are the ones ``tritonclient.grpc`` ships (Triton's
``grpc_service.proto``, a superset of KServe's ``grpc_predict_v2.proto``: the repository RPCs come from it), so a
Triton client talks to it unchanged. Tensors travel in ``raw_input_contents`` / ``raw_output_contents`` (or the
typed ``contents`` fields on input); outputs always go raw, as Triton sends them.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..errors import BadRequest, MissingExtra, NotFound, ServeError, Unavailable, UsageError
from .protocol import TO_NUMPY, check_feeds, check_outputs, datatype
from .raw import Decoded, RawInput, RawLimits, items, serialize_bytes, split_bytes

try:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc
except ImportError as exc:  # pragma: no cover - the extra is part of the dev install
    raise MissingExtra("grpcio and tritonclient[grpc] (for serve --grpc-port)", "grpc") from exc

# HTTP status -> the gRPC status the protocol gives it
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         411: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
# the typed field of InferTensorContents each datatype's values travel in
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "BOOL": "bool_contents"}


def decode(request, spec, raw_input: RawInput | None = None, limits: RawLimits = RawLimits(),
           labels: bool = False) -> tuple[dict, list | None]:
    """The request's inputs as arrays, checked like an HTTP request's (names, datatypes, shapes, sizes, values); and
    its raw items, where the bundle takes ``raw_input``: BYTES in ``bytes_contents`` or raw."""
    expected = spec.by_name
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs")
    feeds, found = {}, None
    for i, inp in enumerate(request.inputs):
        if raw_input is not None and inp.name == raw_input.name:
            if found is not None:
                raise BadRequest(f"input {inp.name!r} is given twice")
            if inp.datatype != "BYTES":
                raise BadRequest(f"input {inp.name!r} is {raw_input.kind}: its datatype is BYTES (one "
                                 f"{raw_input.kind} an item), not {inp.datatype}")
            count = math.prod(max(0, d) for d in inp.shape)
            values = split_bytes(raw[i], count, inp.name) if raw else list(inp.contents.bytes_contents)
            found = items(values, count, raw_input, limits)
            continue
        if inp.name not in expected:
            names = ([raw_input.name] if raw_input else []) + list(expected)
            raise BadRequest(f"unknown input {inp.name!r}; the model takes {names}")
        if inp.name in feeds:
            raise BadRequest(f"input {inp.name!r} is given twice")
        t = expected[inp.name]
        want = t.np_dtype
        if TO_NUMPY.get(inp.datatype) != t.dtype:
            raise BadRequest(f"input {inp.name!r}: datatype {inp.datatype} does not match the model's {datatype(want)}")
        shape = list(inp.shape)
        if shape and min(shape) < 0:
            raise BadRequest(f"input {inp.name!r}: shape {shape} has a negative dimension")
        count = math.prod(shape)
        if raw:
            nbytes = count * want.itemsize
            if len(raw[i]) != nbytes:
                raise BadRequest(f"input {inp.name!r}: {len(raw[i])} bytes of raw_input_contents do not fit shape "
                                 f"{shape} of {inp.datatype} ({nbytes} bytes)")
            array = np.frombuffer(raw[i], dtype=want).reshape(shape)
        else:
            values = getattr(inp.contents, CONTENTS.get(inp.datatype, "bytes_contents"))
            if len(values) != count:
                raise BadRequest(f"input {inp.name!r}: {len(values)} values do not fill shape {shape} ({count} values)")
            try:
                array = np.array(values, dtype=want).reshape(shape)
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadRequest(f"input {inp.name!r}: data is not {inp.datatype}: {str(exc)[:160]}") from None
        feeds[inp.name] = array
    if found is not None and feeds:
        raise BadRequest(f"give either the raw input {raw_input.name!r} or the tensors {list(feeds)}, not both")
    if found is None:
        check_feeds(feeds, spec)
    check_outputs(request, spec.output_names + (["label", "score"] if labels else []))
    return feeds, found


def top_k(request) -> int:
    """The request's 'top_k' parameter (how many labels a classifier answers with), 1 without one."""
    if "top_k" not in request.parameters:
        return 1
    p = request.parameters["top_k"]
    k = p.int64_param or p.uint64_param
    if not 1 <= k <= 1000:
        raise BadRequest(f"parameter 'top_k' must be an integer from 1 to 1000, got {k}")
    return k


def deadline_s(request, context) -> float | None:
    """The nearer of the call's gRPC deadline and the request's 'timeout' parameter (microseconds)."""
    found = [context.time_remaining()]
    if "timeout" in request.parameters:
        p = request.parameters["timeout"]
        us = p.int64_param or p.uint64_param or p.double_param
        if not us > 0:
            raise BadRequest("parameter 'timeout' must be a positive number of microseconds")
        found.append(us / 1e6)
    found = [f for f in found if f is not None]
    return min(found) if found else None


def encode(request, outputs: dict[str, np.ndarray], model: str, version: str):
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    names = [o.name for o in request.outputs] or list(outputs)
    for n in names:
        a = np.ascontiguousarray(outputs[n])
        strings = a.dtype == object  # BYTES: a classifier's labels
        response.outputs.add(name=n, datatype="BYTES" if strings else datatype(a.dtype), shape=list(a.shape))
        response.raw_output_contents.append(serialize_bytes(a) if strings else a.tobytes())
    return response


class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server):
        self.server = server

    async def _fail(self, context, e, exc: ServeError):
        self.server.count(e, exc)
        await context.abort(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), str(exc))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server.is_ready())

    async def ModelReady(self, request, context):
        try:
            e = self.server.find(request.name, request.version or None)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=e.why is None and not self.server.draining)

    async def ServerMetadata(self, request, context):
        from .app import VERSION
        extensions = ["binary_tensor_data"] + (["model_repository"] if self.server.config.admin_token else [])
        return pb.ServerMetadataResponse(name="torchship", version=VERSION, extensions=extensions)

    async def ModelMetadata(self, request, context):
        from .protocol import metadata
        try:
            e = self.server.find(request.name, request.version or None)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        m = metadata(e.name, sorted(self.server.models[e.name]), f"torchship_{e.manifest.runtime}", e.spec, e.raw,
                     e.labels is not None)

        def tensors(ts):
            return [pb.ModelMetadataResponse.TensorMetadata(**t) for t in ts]
        return pb.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"],
                                        inputs=tensors(m["inputs"]), outputs=tensors(m["outputs"]))

    async def ModelInfer(self, request, context):
        s = self.server
        s.last_request = time.monotonic()
        name, version = request.model_name, request.model_version or None
        try:
            e = s.find(name, version)
        except NotFound as exc:
            return await self._fail(context, None, exc)
        try:
            if s.draining:
                raise Unavailable("the server is shutting down")
            refused = s.cannot_take(e)
            if refused is not None:
                raise refused
        except ServeError as exc:
            return await self._fail(context, e, exc)

        async def decoded(e) -> Decoded:
            feeds, found = decode(request, e.spec, e.raw, s.config.raw, e.labels is not None)
            return Decoded(request, None if found is not None else feeds, found, deadline=deadline_s(request, context),
                           top_k=top_k(request))
        try:
            e, _, outputs = await s.submit(e, name, version, decoded)
        except ServeError as exc:
            return await self._fail(context, e, exc)
        e.metrics.success.inc()
        return encode(request, outputs, e.name, e.version)

    async def _admin(self, context, change) -> None:
        """A repository change (``change()``, awaited) behind the admin token, sent as 'authorization' metadata."""
        if not self.server.authorized(dict(context.invocation_metadata()).get("authorization", "")):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "model repository changes need --repository and the "
                                "admin token, sent as metadata 'authorization: Bearer TOKEN'")
        try:
            await change()
        except ServeError as exc:
            await context.abort(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), str(exc))

    async def RepositoryModelLoad(self, request, context):
        await self._admin(context, lambda: self.server.reload(request.model_name))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._admin(context, lambda: self.server.unload(request.model_name))
        return pb.RepositoryModelUnloadResponse()


async def start(server, host: str, port: int, reuse_port: bool = False):
    """A grpc.aio server on the running event loop, serving ``server``'s models; returns it (``await g.stop(grace)``).
    ``reuse_port``: one of several server processes sharing the port (else a port in use is an error)."""
    limit = server.config.max_body_bytes
    g = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1),
                                 ("grpc.so_reuseport", int(reuse_port))])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Service(server), g)
    if g.add_insecure_port(f"{host}:{port}") == 0:
        raise UsageError(f"cannot bind the gRPC port {host}:{port} (in use?): choose another --grpc-port")
    await g.start()
    return g
