"""The server: the bundles it serves, its limits (``ServeConfig``) and ``Server.submit``, the one request path every
front calls (admission, decoding, raw-input processing, queueing); the wires are ``http.py``, ``grpc.py`` and
``openai.py``.
"""
from __future__ import annotations

import asyncio
import hmac
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable

import orjson

from .. import bundle, runtimes, scratch
from ..bundle import Bundle
from ..errors import (BadRequest, Busy, ModelFailed, NotFound, QueueFull, ServeError, ShuttingDown, SpecError,
                      TorchshipError, Unavailable)
from .batcher import BatchConfig
from ..processing.labels import answer
from .metrics import Metrics
from .protocol import check_feeds
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
        self.snapshots = scratch.make("serve")
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
        scratch.remove(self.snapshots)

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


Answer = tuple[int, bytes, dict]


def problem(status: int, message: str, headers: dict | None = None) -> Answer:
    return status, orjson.dumps({"error": message}), {"content-type": "application/json", **(headers or {})}
