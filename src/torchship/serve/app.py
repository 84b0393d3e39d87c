"""The Open Inference Protocol (KServe v2) over HTTP, as a Starlette app.

Routes: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}][/ready], /metrics;
POST /v2/models/{m}[/versions/{v}]/infer; with a repository and a token,
POST /v2/repository/models/{m}/load and /unload (load the new version, then swap).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import re
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import bundle
from ..bundle import Bundle
from ..errors import (BadRequest, Busy, Disconnected, NotFound, ServeError, ShuttingDown, SpecError, TooLarge,
                      TorchshipError)
from .batcher import BatchConfig
from .metrics import Metrics
from .protocol import HEADER, decode_inputs, encode_outputs, metadata, split_body
from .registry import Entry, discover, latest, load_entry, nonfinite

VERSION = "0.1.0"


@dataclass(frozen=True)
class ServeConfig:
    batch: BatchConfig = BatchConfig()
    max_batch_size: int | None = None  # default: the bundle's chosen batch size
    max_body_bytes: int = 64 * 2**20
    threads: int | None = None  # intra-op threads per worker (default: cores / workers)
    workers: int = 1
    repository: Path | None = None
    admin_token: str | None = None
    trust_code: bool = False  # bundles whose loading runs code (Python from outside torchship, native) may load
    verify_key: Path | None = None  # a public key (PEM): every bundle must carry a valid signature by it


Found = tuple[str, str, Bundle]  # (name, version, verified snapshot)


def open_bundles(paths: list[Path], into: Path, config: "ServeConfig") -> list[Found]:
    """Every bundle under ``paths`` (bundles or repositories), each verified once (its signature too, with a key) into
    a private snapshot in ``into``: what is served, reloaded or given to a restarted worker later is what was verified
    now. A bundle whose loading runs code is refused here without consent."""
    found: list[Found] = []
    try:
        for path in paths:
            for name, version, p in discover(Path(path)):
                verified = bundle.snapshot(p, Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=into)) / "b",
                                           config.verify_key)
                found.append((name, version, verified))
                bundle.consent(verified, config.trust_code)
    except BaseException:
        for _, _, b in found:
            bundle.remove(b)
        raise
    return found


class Server:
    """State shared by the routes: the models, readiness and metrics."""

    def __init__(self, paths: list[Path], config: ServeConfig, opened: list[Found] | None = None):
        self.paths, self.config = [Path(p) for p in paths], config
        self.opened = opened
        self.snapshots = Path(tempfile.mkdtemp(prefix="torchship-serve-"))
        self.models: dict[str, dict[str, Entry]] = {}
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.last_request = 0.0  # time.monotonic() of the latest infer request
        # past this many infer requests in the server (read, queued or running), answer 503 before reading the body:
        # under overload the event loop itself is a queue, and the batcher's limits cannot shed what it has not seen
        b = config.batch
        self.max_in_flight = b.max_queue_requests + 64
        if b.slo_s is not None:  # SLO mode: a few batches' worth
            self.max_in_flight = min(self.max_in_flight, 4 * (config.max_batch_size or b.max_batch_size) + 64)
        self.in_flight = 0
        self._swap = asyncio.Lock()

    def batch_config(self, manifest) -> BatchConfig:
        size = self.config.max_batch_size or manifest.max_batch_size or self.config.batch.max_batch_size
        return replace(self.config.batch, max_batch_size=int(size))

    async def open(self, paths: list[Path]) -> list[Found]:
        return await asyncio.get_running_loop().run_in_executor(None, open_bundles, paths, self.snapshots, self.config)

    async def start(self) -> None:
        opened, self.opened = self.opened if self.opened is not None else await self.open(self.paths), None
        for name, version, verified in opened:
            await self.add(name, version, verified)
        self.ready = True

    async def add(self, name: str, version: str, verified: Bundle) -> Entry:
        entry = await load_entry(name, version, verified, self.batch_config(verified.manifest), self.metrics,
                                 self.config.threads, self.config.workers, self.config.trust_code)
        old = self.models.setdefault(name, {}).get(version)
        self.models[name][version] = entry  # the swap: new requests go to the new entry from here on
        if old:
            await old.stop()
        return entry

    async def remove(self, name: str) -> None:
        versions = self.models.pop(name, {})
        for e in versions.values():
            e.ready = False
        await asyncio.gather(*(e.stop() for e in versions.values()))

    async def stop(self) -> None:
        self.ready = False
        for name in list(self.models):
            await self.remove(name)
        shutil.rmtree(self.snapshots, ignore_errors=True)

    def idle(self) -> bool:
        return all(e.batcher.idle for v in self.models.values() for e in v.values())

    def find(self, name: str, version: str | None) -> Entry:
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}; serving {sorted(self.models)}")
        entry = versions.get(version) if version else latest(versions)
        if entry is None:
            raise NotFound(f"model {name!r} has no version {version!r}; versions: {sorted(versions)}")
        return entry


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(receive, declared: bytes | None, limit: int) -> bytes:
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {int(declared)} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


Answer = tuple[int, bytes, dict]


def problem(status: int, message: str, headers: dict | None = None) -> Answer:
    return status, json.dumps({"error": message}).encode(), {"content-type": "application/json", **(headers or {})}


async def infer(server: Server, name: str, version: str | None, headers: dict[bytes, bytes], receive) -> Answer:
    """POST .../infer: decode and check the request, queue it, encode the outputs. Plain ASGI rather than a
    Starlette route, because this path is the server's throughput: routing, middleware and Request objects
    cost several times what an HTTP request itself costs when the model runs in microseconds."""
    server.last_request = time.monotonic()
    try:
        e = server.find(name, version)
    except NotFound as exc:
        return problem(404, str(exc))
    if server.in_flight >= server.max_in_flight:
        exc = Busy(f"server busy: {server.in_flight} requests in flight (limit {server.max_in_flight})")
        e.metrics.rejected(exc.reason)
        e.metrics.failure(exc.reason)
        return problem(exc.status, str(exc), exc.headers)
    server.in_flight += 1
    try:
        return await _infer(server, e, name, version, headers, receive)
    finally:
        server.in_flight -= 1


async def _infer(server: Server, e: Entry, name: str, version: str | None, headers: dict[bytes, bytes], receive) -> Answer:
    def fail(status, reason, message, extra=None):
        e.metrics.failure(reason)
        return problem(status, message, extra)

    def refused(exc: ServeError):
        if exc.status in (503, 504):
            e.metrics.rejected(exc.reason)
        return fail(exc.status, exc.reason, str(exc), exc.headers)
    try:
        body = await read_body(receive, headers.get(b"content-length"), server.config.max_body_bytes)
        header_length = headers.get(HEADER.lower().encode())
        req, binary = split_body(body, header_length.decode("latin-1") if header_length is not None else None)
        feeds = decode_inputs(req, binary, e.spec)
        e.spec.check(feeds)
        bad = nonfinite(feeds)
        if bad:
            raise BadRequest(f"input(s) {bad} hold NaN or infinite values, which the model cannot take")
        timeout = (req.get("parameters") or {}).get("timeout")  # microseconds, as Triton's clients send it
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise BadRequest(f"parameter 'timeout' must be a positive number of microseconds, got {timeout!r}")
    except ServeError as exc:
        return refused(exc)
    except SpecError as exc:
        return fail(400, "bad_request", str(exc))
    e.metrics.queue_depth.set(e.batcher.depth)
    try:
        try:
            outputs = await e.batcher.submit(feeds, timeout / 1e6 if timeout else None)
        except ShuttingDown:  # swapped out by a reload between lookup and submit: the new version takes it
            if server.draining:
                raise
            e = server.find(name, version)
            outputs = await e.batcher.submit(feeds, timeout / 1e6 if timeout else None)
    except ShuttingDown as exc:
        return fail(exc.status, exc.reason, str(exc), exc.headers)
    except ServeError as exc:
        return refused(exc)
    except Exception as exc:
        return fail(500, "model_error", f"the model failed on this batch: {type(exc).__name__}: {exc}")
    finally:
        e.metrics.queue_depth.set(e.batcher.depth)
    try:
        content, extra = encode_outputs(req, outputs, e.name, e.version)
    except BadRequest as exc:
        return fail(400, "bad_request", str(exc))
    e.metrics.success.inc()
    return 200, content, extra


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
        ok = server.ready and not server.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def entry_of(request) -> Entry:
        return server.find(request.path_params["model"], request.path_params.get("version"))

    async def model_meta(request):
        try:
            e = entry_of(request)
        except NotFound as exc:
            return error(404, str(exc))
        versions = sorted(server.models[e.name])
        return JSONResponse(metadata(e.name, versions, f"torchship_{e.manifest.runtime}", e.spec))

    async def model_ready(request):
        try:
            e = entry_of(request)
        except NotFound as exc:
            return error(404, str(exc))
        ok = e.ready and not server.draining
        return JSONResponse({"name": e.name, "ready": ok}, status_code=200 if ok else 503)

    async def metrics(request):
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def authorized(request) -> bool:
        token = server.config.admin_token
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(token) and server.config.repository is not None and hmac.compare_digest(given, token)

    async def repo_load(request):
        if not authorized(request):
            return error(403, "model repository changes need --repository and a matching --admin-token (Authorization: Bearer TOKEN)")
        name = request.path_params["model"]
        try:
            paths = [p for n, v, p in discover(server.config.repository) if n == name]
            if not paths:
                return error(404, f"no model {name!r} in repository {server.config.repository}")
            found = await server.open(paths)
            async with server._swap:
                for n, v, verified in found:
                    await server.add(n, v, verified)
        except TorchshipError as exc:
            return error(400, f"cannot load {name!r}: {exc}")
        return JSONResponse({"name": name, "versions": [v for _, v, _ in found]})

    async def repo_unload(request):
        if not authorized(request):
            return error(403, "model repository changes need --repository and a matching --admin-token (Authorization: Bearer TOKEN)")
        name = request.path_params["model"]
        if name not in server.models:
            return error(404, f"unknown model {name!r}")
        async with server._swap:
            await server.remove(name)
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
        if found is None:
            async def wrapped(message):
                if message["type"] == "http.response.start" and self.server.draining:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                await send(message)
            return await self.app(scope, receive, wrapped)
        if scope["method"] != "POST":
            status, body, headers = problem(405, f"infer takes POST, not {scope['method']}", {"Allow": "POST"})
        else:
            status, body, headers = await infer(self.server, found[1], found[2], dict(scope["headers"]), receive)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()] + [(b"content-length", b"%d" % len(body))]
        if self.server.draining:
            raw.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
