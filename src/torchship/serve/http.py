"""The Open Inference Protocol (KServe v2) over HTTP: the wire around ``app.Server``'s one request path.

Routes: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}][/ready], /metrics;
POST /v2/models/{m}[/versions/{v}]/infer (plain ASGI, ``infer``); with a repository and a token,
POST /v2/repository/models/{m}/load and /unload (load the new version, then swap); the OpenAI-compatible
/v1/embeddings and /v1/models (``openai.py``).
"""
from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import BadRequest, Disconnected, LengthRequired, NotFound, ServeError, TooLarge
from . import protocol
from .app import VERSION, Answer, Found, ServeConfig, Server, problem
from .protocol import HEADER, encode_outputs, metadata
from .raw import Decoded
from .registry import Entry


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(receive, size: int) -> bytes:
    """The body, once its declared size was checked against the limits (a body longer than declared is cut there)."""
    chunks, got = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected("client disconnected")
        chunk = message.get("body", b"")
        got += len(chunk)
        if got > size:
            raise TooLarge(f"body is longer than its Content-Length of {size} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def body_size(headers: dict[bytes, bytes], config: "ServeConfig") -> tuple[int, str | None]:
    """The body's length and its JSON header's length, checked against the limits before a byte of it is read:
    JSON has its own, smaller limit (parsing it costs far more than copying binary tensors)."""
    declared, head = headers.get(b"content-length"), headers.get(HEADER.lower().encode())
    if declared is None or not declared.isdigit():
        raise LengthRequired("an infer request needs a Content-Length header")
    size = int(declared)
    if size > config.max_body_bytes:
        raise TooLarge(f"body of {size} bytes is over the {config.max_body_bytes / 2**20:g} MB limit (--max-body-mb)")
    if head is not None and not head.isdigit():
        raise BadRequest(f"{HEADER} must be a number of bytes, got {head.decode('latin-1')[:40]!r}")
    json_size = size if head is None else int(head)
    if json_size > config.max_json_bytes:
        raise TooLarge(f"JSON of {json_size} bytes is over the {config.max_json_bytes / 2**20:g} MB limit for JSON "
                       "(--max-json-mb): send tensors as binary data (the binary tensor data extension: "
                       f"{HEADER}), up to the {config.max_body_bytes / 2**20:g} MB body limit")
    return size, head.decode("latin-1") if head is not None else None


OFF_LOOP_BYTES = 256 * 1024  # JSON bigger than this is decoded on a thread, so that other requests keep flowing


async def infer(server: Server, name: str, version: str | None, headers: dict[bytes, bytes], receive) -> Answer:
    """POST .../infer: admit (or shed before reading the body), then the server's one request path with this wire's
    decoding, then encode the outputs. Plain ASGI rather than a Starlette route, because this path is the server's
    throughput: routing, middleware and Request objects cost several times what an HTTP request itself costs when the
    model runs in microseconds."""
    server.last_request = time.monotonic()
    e, refused = server.admission(name, version)
    if refused is not None:
        return refused
    size = 0

    async def decode(e: Entry) -> Decoded:
        nonlocal size
        size, head = body_size(headers, server.config)
        body = await read_body(receive, size)
        args = (body, head, e.spec, e.raw, server.config.raw, e.labels is not None)
        if (len(body) if head is None else int(head)) > OFF_LOOP_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, protocol.decode, *args)
        return protocol.decode(*args)
    try:
        e, d, outputs = await server.submit(e, name, version, decode)
    except ServeError as exc:
        return server.error_answer(e, exc)
    content, extra = encode_outputs(d.request, outputs, e.name, e.version)
    e.metrics.success.inc()
    if size > TRIM_BYTES:
        del d, outputs
        asyncio.get_running_loop().run_in_executor(None, give_back_memory)
    return 200, content, extra


TRIM_BYTES = 4 * 2**20  # after a request this big, freed memory goes back to the system


def give_back_memory() -> None:
    """glibc keeps freed memory for reuse (after one big free, its mmap threshold rises and later big arrays come
    from the heap); ``malloc_trim`` hands the free pages back, so RSS returns near its level before the request."""
    global _trim
    if _trim is None:
        import ctypes
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _trim = lambda pad: 0  # noqa: E731
    _trim(0)


_trim = None


def create_app(paths: list[Path], config: ServeConfig | None = None, opened: list[Found] | None = None) -> Starlette:
    """The ASGI app serving ``paths``; ``opened`` (from ``open_bundles``) when they were verified beforehand."""
    server = Server(paths, config or ServeConfig(), opened)

    @asynccontextmanager
    async def lifespan(app):  # under an ASGI server that did not start it already (tests, Ray replicas)
        started_here = not server.ready
        if started_here:
            await server.start()
        try:
            yield
        finally:
            if started_here:
                await server.stop()

    async def root(request):
        return JSONResponse({"name": "torchship", "version": VERSION, "extensions": ["binary_tensor_data"]
                             + (["model_repository"] if server.config.admin_token else [])})

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        ok = server.is_ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def entry_of(request) -> Entry:
        return server.find(request.path_params["model"], request.path_params.get("version"))

    async def model_meta(request):
        try:
            e = entry_of(request)
        except NotFound as exc:
            return error(404, str(exc))
        versions = sorted(server.models[e.name])
        return JSONResponse(metadata(e.name, versions, f"torchship_{e.manifest.runtime}", e.spec, e.raw,
                                     e.labels is not None))

    async def model_ready(request):
        try:
            e = entry_of(request)
        except NotFound as exc:
            return error(404, str(exc))
        ok = e.why is None and not server.draining
        return JSONResponse({"name": e.name, "ready": ok}, status_code=200 if ok else 503)

    async def metrics(request):
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    forbidden = ("model repository changes need --repository and the admin token (TORCHSHIP_ADMIN_TOKEN or "
                 "--admin-token-file), sent as 'Authorization: Bearer TOKEN'")

    async def repo_load(request):
        if not server.authorized(request.headers.get("authorization", "")):
            return error(403, forbidden)
        name = request.path_params["model"]
        try:
            versions, gone = await server.reload(name)
        except ServeError as exc:
            return error(exc.status, str(exc))
        return JSONResponse({"name": name, "versions": versions, "unloaded": gone})

    async def repo_unload(request):
        if not server.authorized(request.headers.get("authorization", "")):
            return error(403, forbidden)
        name = request.path_params["model"]
        try:
            await server.unload(name)
        except ServeError as exc:
            return error(exc.status, str(exc))
        return JSONResponse({"name": name, "unloaded": True})

    routes = [
        Route("/v2", root), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_meta), Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/ready", model_ready), Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/repository/models/{model}/load", repo_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repo_unload, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return _Front(app, server)


_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_OPENAI = {"/v1/embeddings": "POST", "/v1/models": "GET"}  # the OpenAI-compatible front (serve/openai.py)


class _Front:
    """The ASGI app the HTTP server runs: POST .../infer straight to ``infer``, everything else to Starlette.
    While draining, every response says ``Connection: close``, so clients stop reusing connections that the
    server is about to close (a request sent on one would be lost in flight)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        found = _INFER.fullmatch(scope["path"])
        if found is None and scope["path"] in _OPENAI:
            return await self._openai(scope, receive, send)
        if found is None:
            async def wrapped(message):
                if message["type"] == "http.response.start" and self.server.draining:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                await send(message)
            return await self.app(scope, receive, wrapped)
        if scope["method"] != "POST":
            self.server.unknown.failure("method")
            status, body, headers = problem(405, f"infer takes POST, not {scope['method']}", {"Allow": "POST"})
        else:
            status, body, headers = await infer(self.server, found[1], found[2], dict(scope["headers"]), receive)
        await self._send(send, status, body, headers)

    async def _openai(self, scope, receive, send):
        from . import openai
        path, method = scope["path"], scope["method"]
        if method != _OPENAI[path]:
            self.server.unknown.failure("method")
            answer = openai.error(405, f"{path} takes {_OPENAI[path]}, not {method}", {"Allow": _OPENAI[path]})
        elif path == "/v1/models":
            answer = openai.models(self.server)
        else:
            self.server.last_request = time.monotonic()
            async def read() -> bytes:
                size, _ = body_size(dict(scope["headers"]), self.server.config)
                return await read_body(receive, size)
            answer = await openai.embeddings(self.server, read)
        await self._send(send, *answer)

    async def _send(self, send, status: int, body: bytes, headers: dict) -> None:
        raw = [(k.encode(), v.encode()) for k, v in headers.items()] + [(b"content-length", b"%d" % len(body))]
        if self.server.draining:
            raw.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
