"""The Open Inference Protocol (KServe v2) over HTTP, as a Starlette app.

Routes: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}][/ready], /metrics;
POST /v2/models/{m}[/versions/{v}]/infer; with a repository and a token,
POST /v2/repository/models/{m}/load and /unload (load the new version, then swap).
"""
from __future__ import annotations

import asyncio
import hmac
import re
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable

import orjson

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import bundle, runtimes
from ..bundle import Bundle
from ..errors import (BadRequest, Busy, Disconnected, LengthRequired, ModelFailed, NotFound, QueueFull, ServeError,
                      ShuttingDown, SpecError, TooLarge, TorchshipError, Unavailable)
from .batcher import BatchConfig
from ..processing.labels import answer
from .metrics import Metrics
from . import protocol
from .protocol import HEADER, check_feeds, encode_outputs, metadata
from .raw import Decoded, RawLimits
from .registry import Entry, discover, latest, load_entry

VERSION = "0.1.0"


@dataclass(frozen=True)
class ServeConfig:
    batch: BatchConfig = BatchConfig()
    max_batch_size: int | None = None  # default: the bundle's chosen batch size
    max_body_bytes: int = 64 * 2**20
    max_json_bytes: int = 16 * 2**20  # JSON (the whole body, or the JSON header before binary tensors)
    threads: int | None = None  # intra-op threads per worker (default: cores / (procs x workers); see load_entry)
    procs: int = 1  # server processes on the port (serve --procs), which share the cores
    workers: int = 1
    repository: Path | None = None
    admin_token: str | None = None
    trust_code: bool = False  # bundles whose loading runs code (Python from outside torchship, native) may load
    verify_key: Path | None = None  # a public key (PEM): every bundle must carry a valid signature by it
    raw: RawLimits = RawLimits()  # raw input (text): items a request, bytes an item


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
                runtimes.get(verified.manifest.runtime)  # its packages installed (a slim install has no torch)
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
        self.unknown = self.metrics.model("", "")  # refusals of requests for no model served
        self.ready = False
        self.draining = False
        self.last_request = 0.0  # time.monotonic() of the latest infer request
        # past this many infer requests not yet answered by a model, across models (being read, queued or running),
        # answer 503 before reading the body
        b = config.batch
        self.max_in_flight = b.max_queue_requests + 64
        if b.slo_s is not None:  # SLO mode: a few batches' worth
            self.max_in_flight = min(self.max_in_flight, 4 * (config.max_batch_size or b.max_batch_size) + 64)
        self._swap = asyncio.Lock()
        self._shed: dict[tuple[str, str], Answer] = {}  # the 503 answers, by (reason, message)
        # with several server processes on the port (serve --procs): sends a repository change to every one of them
        self.broadcast: Callable[[str, str], Awaitable[dict]] | None = None

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
                                 self.config.threads, self.config.workers, self.config.trust_code, self.config.procs)
        old = self.models.setdefault(name, {}).get(version)
        self.models[name][version] = entry  # the swap: new requests go to the new entry from here on
        if old:
            await old.stop()
        return entry

    async def remove(self, name: str, version: str | None = None) -> None:
        """Unload a model (every version, or one): new requests stop finding it at once; queued ones still run."""
        if version is None:
            versions = self.models.pop(name, {})
        else:
            versions = {version: self.models.get(name, {}).pop(version)}
            if not self.models.get(name):
                self.models.pop(name, None)
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

    def unanswered(self) -> int:
        """Infer requests admitted and not yet answered by a model: being read, queued or running (one whose outputs
        are ready no longer counts, though the event loop has yet to send them)."""
        return sum(e.reading + e.batcher.depth + e.batcher.in_flight for v in self.models.values() for e in v.values())

    def cannot_take(self, e: Entry) -> ServeError | None:
        """Why ``e`` cannot take one more infer request now (None: it can): a model that cannot run, no room in
        flight, a full queue (queued, or admitted and being read). Checked before the body is read, so that shedding
        costs a few microseconds whatever the number of connections."""
        why = e.why
        if why is not None:
            return Unavailable(f"model {e.name!r} version {e.version} cannot serve now: {why}")
        if self.unanswered() >= self.max_in_flight:
            return Busy(f"server busy: the limit of {self.max_in_flight} requests in flight is reached")
        limit = e.batcher.config.max_queue_requests
        if e.batcher.depth + e.reading >= limit:
            return QueueFull(f"queue full: --max-queue {limit} reached (requests queued or being read)")
        return None

    def admission(self, name: str, version: str | None) -> "tuple[Entry | None, Answer | None]":
        """(the entry, None), or the refusal of an infer request that its path decides alone: an unknown model, a
        model that cannot serve, a full queue, no room in flight."""
        try:
            e = self.find(name, version)
        except NotFound as exc:
            return None, self.error_answer(None, exc)
        exc = self.cannot_take(e)
        return e, None if exc is None else self.error_answer(e, exc, reuse=True)

    def count(self, e: Entry | None, exc: ServeError) -> None:
        """A refused or failed request, counted by reason (unknown models under model="")."""
        series = e.metrics if e is not None else self.unknown
        series.failure(exc.reason)
        if exc.status in (503, 504):
            series.rejected(exc.reason)

    def error_answer(self, e: Entry | None, exc: ServeError, reuse: bool = False) -> Answer:
        """The HTTP answer to a refused or failed request, counted. With ``reuse`` (the refusals of ``cannot_take``,
        whose messages name only a model and a limit), each answer is made once and then is the same object every
        time: the header-time refusal keeps its bytes on the wire by that object."""
        self.count(e, exc)
        if not reuse:
            return problem(exc.status, str(exc), exc.headers)
        key = (exc.reason, str(exc))
        answer = self._shed.get(key)
        if answer is None:
            answer = problem(exc.status, key[1], exc.headers)
            if len(self._shed) < 1024:
                self._shed[key] = answer
        return answer

    async def submit(self, e: Entry, name: str, version: str | None,
                     decode: Callable[[Entry], Awaitable[Decoded]]) -> tuple[Entry, Decoded, dict]:
        """The one request path of every front (HTTP, gRPC, OpenAI), for a request admitted to ``e``: ``decode`` it
        (the wire's part: read and check), turn raw input into tensors with the bundle's pipeline, queue it on the
        batcher, run it. Returns (the entry that ran it, the request, its outputs); every failure is a ServeError."""
        e.reading += 1  # holds a place in the queue from here, while its body is read and decoded
        queued = False
        try:
            d = await decode(e)
            if d.feeds is None:
                d.feeds = await self.process(e, d)
            e.reading -= 1
            queued = True  # the batcher's queue holds it from here (submit queues it before its first await)
            e, outputs = await self.run(e, name, version, d.feeds, d.deadline)
            if e.labels is not None:  # a classifier answers in its terms too: its labels and their scores
                outputs = {**outputs, **answer(e.labels, outputs, d.top_k)}
        except ServeError:
            raise
        except Exception as exc:
            raise ModelFailed(f"the model failed on this batch: {type(exc).__name__}: {exc}") from exc
        finally:
            if not queued:
                e.reading -= 1
        return e, d, outputs

    async def process(self, e: Entry, d: Decoded) -> dict:
        """Raw items (text, images, token arrays) as the model's tensors, by the bundle's own pipeline: text on the
        event loop for a few short items, else on a thread (the tokenizer lets the GIL go; images are always decoded
        there); counted in /metrics."""
        pipe = e.pipeline
        if pipe is None or (d.ids is not None and pipe.kind != "text"):
            raise BadRequest(f"model {e.name!r} takes tensors {e.spec.input_names}, not "
                             f"{'token arrays' if pipe else 'raw input'} (its bundle has no "
                             f"{'tokenizer' if pipe else 'processing'}: optimize it from a source that has one, or "
                             "give --tokenizer)")
        started = time.perf_counter()

        def work() -> dict:
            try:
                feeds = pipe.encode(d.items) if d.items is not None else pipe.from_ids(d.ids)
            except SpecError as exc:
                raise BadRequest(str(exc)) from None
            check_feeds(feeds, e.spec)
            return feeds
        items = d.items if d.items is not None else d.ids
        if pipe.kind == "image" or len(items) > 8 or sum(map(len, items)) > 2048:
            feeds = await asyncio.get_running_loop().run_in_executor(None, work)
        else:
            feeds = work()
        e.metrics.processed(pipe.tokens(feeds), time.perf_counter() - started)
        return feeds

    async def run(self, e: Entry, name: str, version: str | None, feeds, deadline: float | None):
        """Queue decoded inputs on the model's batcher; (the entry that ran them, their outputs)."""
        try:
            return e, await e.batcher.submit(feeds, deadline)
        except ShuttingDown:  # swapped out by a reload between lookup and submit: the new version takes it
            if self.draining:
                raise
            e = self.find(name, version)
            return e, await e.batcher.submit(feeds, deadline)

    def authorized(self, given: str) -> bool:
        """Only ``Bearer TOKEN`` (the value of an Authorization header), compared in constant time."""
        token, scheme = self.config.admin_token, "bearer "
        if not token or self.config.repository is None or given[:len(scheme)].lower() != scheme:
            return False
        return hmac.compare_digest(given[len(scheme):].strip().encode(), token.encode())

    async def reload(self, name: str) -> tuple[list[str], list[str]]:
        """``reload_here`` in this process, or in every server process on the port."""
        if self.broadcast is None:
            return await self.reload_here(name)
        done = await self.broadcast("load", name)
        return done["versions"], done["unloaded"]

    async def unload(self, name: str) -> None:
        if self.broadcast is None:
            return await self.unload_here(name)
        await self.broadcast("unload", name)

    async def reload_here(self, name: str) -> tuple[list[str], list[str]]:
        """Load every version of ``name`` now in the repository (new or changed ones verified, then swapped in) and
        unload the versions no longer there: (versions loaded, versions unloaded). ``NotFound`` when none is left."""
        try:
            paths = [(v, p) for n, v, p in discover(self.config.repository, empty_ok=True) if n == name]
            opened = await self.open([p for _, p in paths]) if paths else []
            # named by the repository's layout (REPO/NAME/VERSION), as at start, not by the manifest inside
            found = [(name, v, verified) for (v, _), (_, _, verified) in zip(paths, opened)]
        except ServeError:
            raise
        except TorchshipError as exc:
            raise BadRequest(f"cannot load {name!r}: {exc}") from None
        async with self._swap:
            gone = [v for v in self.models.get(name, {}) if v not in {v for v, _ in paths}]
            for v in gone:
                await self.remove(name, v)
            for n, v, verified in found:
                await self.add(n, v, verified)
        if not found:
            raise NotFound(f"no model {name!r} in repository {self.config.repository}"
                           + (f"; unloaded its versions {gone}" if gone else ""))
        return [v for _, v, _ in found], gone

    async def unload_here(self, name: str) -> None:
        if name not in self.models:
            raise NotFound(f"unknown model {name!r}")
        async with self._swap:
            await self.remove(name)

    def is_ready(self) -> bool:
        """Every model can serve (a model whose workers cannot come back turns it false), and not draining."""
        return self.ready and not self.draining and all(e.why is None for v in self.models.values() for e in v.values())

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


Answer = tuple[int, bytes, dict]
OFF_LOOP_BYTES = 256 * 1024  # JSON bigger than this is decoded on a thread, so that other requests keep flowing


def problem(status: int, message: str, headers: dict | None = None) -> Answer:
    return status, orjson.dumps({"error": message}), {"content-type": "application/json", **(headers or {})}


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
