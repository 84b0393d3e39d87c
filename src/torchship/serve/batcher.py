"""A dynamic batcher: a plain async queue with no HTTP in it.

Wait for the first request, collect requests of the same shape until the batch is full or the
oldest has waited ``max_queue_delay``, drop those whose deadline has passed, run the batch on a
thread (or, when predicted under ``inline_s``, on the loop's own), split the outputs back. Every path resolves every waiting request, errors included.
Dimensions named in ``paddable`` are padded to the longest request in a batch (with zeros, which an
attention mask ignores) and outputs are cut back per request; other shapes never mix. A model that takes an attention
mask may also have its batches bounded by their real tokens (``max_batch_tokens``).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..errors import DeadlineExceeded, ModelError, QueueFull, ShuttingDown, UsageError, WouldMissSLO
from ..profile import Stats, interpolate
from ..spec import IOSpec


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 32
    max_batch_tokens: int | None = None  # a batch's real tokens (its attention masks' ones) at most this; None: no bound
    max_queue_delay_s: float = 0.0  # as Triton: run what is queued as soon as a runner is free
    max_queue_requests: int = 1024
    max_queue_bytes: int = 256 * 2**20
    preferred_batch_sizes: tuple[int, ...] = ()
    timeout_s: float = 30.0  # server default deadline; a request may only lower it
    slo_s: float | None = None  # SLO mode: dispatch and shed by predicted batch time
    slo_margin: float = 0.1  # fraction of the SLO kept in reserve
    inline_s: float = 0.001  # a batch predicted to take less runs on the event loop's thread (see Batcher._inline)
    busy_delay_s: float = 0.002  # with max_queue_delay 0: how long a batch waits to fill while the loop is saturated

    def __post_init__(self):
        checks = (  # (the serve option, its value in the option's unit, whether it is allowed, the rule)
            ("--max-batch-size", self.max_batch_size, self.max_batch_size >= 1, "at least 1"),
            ("--max-batch-tokens", self.max_batch_tokens or 0, self.max_batch_tokens is None or self.max_batch_tokens >= 1,
             "at least 1"),
            ("--max-queue", self.max_queue_requests, self.max_queue_requests >= 1, "at least 1"),
            ("--max-queue-delay-us", self.max_queue_delay_s * 1e6, self.max_queue_delay_s >= 0, "0 or more"),
            ("--timeout-ms", self.timeout_s * 1e3, self.timeout_s > 0, "positive"),
            ("--slo-ms", (self.slo_s or 0) * 1e3, self.slo_s is None or self.slo_s > 0, "positive"),
            ("--inline-under-ms", self.inline_s * 1e3, self.inline_s >= 0, "0 or more"),
            ("--busy-delay-us", self.busy_delay_s * 1e6, self.busy_delay_s >= 0, "0 or more"),
        )
        wrong = [f"{flag} must be {rule}, got {value:g}" for flag, value, ok, rule in checks if not ok]
        if wrong:
            raise UsageError("; ".join(wrong))


@dataclass(eq=False)
class Item:
    feeds: dict[str, np.ndarray]
    size: int
    key: tuple
    lengths: dict[str, int]
    deadline: float
    future: asyncio.Future
    nbytes: int
    tokens: int = 0  # real tokens: its attention mask's ones (0 for a model without one)
    enqueued: float = field(default_factory=time.monotonic)


class LatencyModel:
    """Predicted compute time per batch size: the bundle's profile, refined online (EMA of measured times)."""

    def __init__(self, profile: Mapping[int, Stats] | None = None, alpha: float = 0.2):
        self.points = {int(k): v.p50_ms / 1e3 for k, v in (profile or {}).items()}
        self.alpha = alpha
        self._sizes = sorted(self.points)

    def predict(self, size: int) -> float:
        """Linear between the measured sizes, the smallest's time below them, proportional past the largest."""
        return interpolate(self.points, size, self._sizes)

    def observe(self, size: int, seconds: float) -> None:
        """Fold in a measured time, at most doubling the prediction: a one-off slow run (the first at a new batch
        size, a preempted thread) must not make SLO mode shed a model that usually runs far faster."""
        old = self.points.get(size, self.predict(size) or None)
        self.points[size] = seconds if old is None else (1 - self.alpha) * old + self.alpha * min(seconds, 2 * old)
        if len(self.points) != len(self._sizes):
            self._sizes = sorted(self.points)


Hook = Callable[..., None]


class ThreadDemand:
    """Seconds the calling thread has run on a CPU or waited in the run queue for one (the wait from Linux's
    schedstat): what it would have run on a core of its own. Where schedstat is missing, its CPU time alone (an
    oversubscribed machine then reads as less busy than it is)."""

    def __init__(self):
        try:
            self._file = open("/proc/thread-self/schedstat", "rb", buffering=0)  # kept open, read again
        except OSError:
            self._file = None

    def __call__(self) -> float:
        waited = 0.0
        if self._file is not None:  # its run time there misses the slice now running: the CPU time is read apart
            self._file.seek(0)
            waited = int(self._file.read().split()[1]) / 1e9
        return time.thread_time() + waited

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class LoopLag:
    """How late the event loop runs a 5 ms timer (smoothed): about the time one pass over its ready sockets takes,
    which is how long a request that has arrived waits before the server even sees it. And how busy the loop's
    thread is: the fraction of the time it runs or waits for a CPU (smoothed; ThreadDemand), near 1 when requests
    keep it from ever waiting for them, whether or not other processes share its core."""

    PERIOD_S = 0.005

    def __init__(self):
        self.lag = 0.0
        self.busy = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._probe())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        demand = ThreadDemand()  # opened here: the loop's own thread
        try:
            cpu = demand()
            while True:
                t = loop.time()
                await asyncio.sleep(self.PERIOD_S)
                now, used = loop.time(), demand()
                self.lag = 0.7 * self.lag + 0.3 * max(0.0, now - t - self.PERIOD_S)
                self.busy = 0.7 * self.busy + 0.3 * min(1.0, (used - cpu) / max(now - t, 1e-6))
                cpu = used
        finally:
            demand.close()


class Batcher:
    def __init__(self, run: Callable[[dict], dict], spec: IOSpec, config: BatchConfig, *,
                 paddable: tuple[str, ...] = (), latency: LatencyModel | None = None, on_batch: Hook | None = None,
                 concurrency: int = 1):
        self.run, self.spec, self.config = run, spec, config
        self.paddable = set(paddable)
        self.latency = latency or LatencyModel()
        self.on_batch = on_batch or (lambda **kw: None)
        self.queue: deque[Item] = deque()
        self.queued_bytes = 0
        self._pending: dict[tuple, int] = {}  # items queued per shape key
        self._pending_tokens: dict[tuple, int] = {}  # and their real tokens
        mask = next((t.name for t in spec.inputs if t.name.endswith("attention_mask")), None)
        self._mask = mask if self.paddable else None  # what real tokens are counted from
        self._skip, self._backoff = 0, self.BACKOFF[0]  # batches left that go at once; the next such run (_learn)
        self.in_flight = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="torchship-runner")
        self._concurrency = concurrency
        self._busy_until = 0.0  # predicted end of the batch running now (time.monotonic())
        self._slots = asyncio.Semaphore(concurrency)  # batches running at once (one per worker process)
        self._running: set[asyncio.Task] = set()
        self._stopping = False
        self.loop_lag = LoopLag()

    # --- public -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self.loop_lag.start()

    async def submit(self, feeds: dict[str, np.ndarray], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue one request (already validated against the spec); returns its outputs."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        size = len(next(iter(feeds.values())))
        nbytes = sum(a.nbytes for a in feeds.values())
        if len(self.queue) >= self.config.max_queue_requests or self.queued_bytes + nbytes > self.config.max_queue_bytes:
            raise QueueFull(f"queue full ({len(self.queue)} requests, {self.queued_bytes} bytes)")
        timeout = self.config.timeout_s if timeout_s is None else min(timeout_s, self.config.timeout_s)
        now = time.monotonic()
        if self.config.slo_s is not None:
            wait = self._predicted_wait(sum(i.size for i in self.queue) + size, now)
            if wait > self.config.slo_s * (1 - self.config.slo_margin):
                raise WouldMissSLO(f"cannot meet the {self.config.slo_s * 1e3:.0f} ms SLO (predicted {wait * 1e3:.1f} ms)")
            timeout = min(timeout, self.config.slo_s)
        key, lengths = self._key(feeds)
        tokens = int(np.count_nonzero(feeds[self._mask])) if self._mask else 0
        item = Item(feeds, size, key, lengths, now + timeout, asyncio.get_running_loop().create_future(), nbytes, tokens)
        self.queue.append(item)
        self.queued_bytes += nbytes
        self._pending[key] = self._pending.get(key, 0) + size
        self._pending_tokens[key] = self._pending_tokens.get(key, 0) + tokens
        # what the batcher waits for: a first request, a full batch; in SLO mode each request (its dispatch time
        # moves with the batch's predicted time)
        if len(self.queue) == 1 or self._ready(key) or self.config.slo_s is not None:
            self._wake.set()
        if not self._slots.locked() and self._dispatch_now(key):
            await self._run_now(key)
        # no request waits forever: past its deadline and then the longest a batch may run, it gets a 504
        # (a model that hangs keeps its thread, but not the client)
        limit = timeout + self.config.timeout_s
        guard = asyncio.get_running_loop().call_later(limit, self._abandon, item, limit)
        try:
            return await item.future
        finally:
            guard.cancel()

    @staticmethod
    def _abandon(item: Item, limit: float) -> None:
        if not item.future.done():
            item.future.set_exception(DeadlineExceeded(f"the model gave no answer within {limit:.1f} s"))

    def _predicted_wait(self, items: int, now: float) -> float:
        """The rest of the batch running now, then the batches that ``items`` (the queue and the newcomer) fill,
        each counted whole: the newcomer leaves with the last of them."""
        batches = -(-items // self.config.max_batch_size)
        last = min(items, self.config.max_batch_size)
        return max(0.0, self._busy_until - now) + batches * self.latency.predict(last)

    @property
    def depth(self) -> int:
        return len(self.queue)

    @property
    def idle(self) -> bool:
        return not self.queue and self.in_flight == 0

    async def stop(self) -> None:
        """Stop: what is queued still runs; then the loop ends and nothing is left waiting."""
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task
        self.loop_lag.stop()
        self._executor.shutdown(wait=True)

    # --- internals --------------------------------------------------------------------------------
    def _key(self, feeds):
        key, lengths = [], {}
        for t in self.spec.inputs:
            shape = feeds[t.name].shape
            for dim, n in zip(t.shape[1:], shape[1:]):
                if dim in self.paddable:
                    lengths[dim] = max(lengths.get(dim, 0), n)
                    key.append(dim)
                else:
                    key.append(n)
        return tuple(key), lengths

    def _dispatch_at(self, oldest: Item, pending: int, delay: float) -> float:
        """Plain mode: the oldest has waited ``delay`` (``_delay()``). SLO mode: its wait plus the predicted batch
        time reaches the SLO minus the margin."""
        if self.config.slo_s is None:
            return oldest.enqueued + delay
        return oldest.enqueued + self.config.slo_s * (1 - self.config.slo_margin) - self.latency.predict(pending)

    SATURATED = 0.8  # the loop's busy fraction past which a batch may wait busy_delay_s to fill
    BACKOFF = (16, 1024)  # batches that go at once after a wait gathered no one, doubling up to the second figure

    def _delay(self, alone: bool) -> float:
        """How long the next batch may wait to fill: max_queue_delay; when it is 0, the event loop's thread is
        saturated and the batcher finds a request ``alone`` in the queue, busy_delay_s. Requests that reach the
        batcher one a turn of the loop (gRPC calls, which grpcio hands over one at a time) would otherwise go in
        batches of one, each paying the whole of a model call, on the thread that also serves them; a loop that
        never waits gives the batch that time for nothing. Requests that arrive many a turn (HTTP) batch by
        themselves and do not wait (in a trial, waiting them 2 ms took HTTP's p99 at concurrency 64 from 13 to 44
        ms for no more throughput). A loop with time to spare (light load) runs what is queued at once, and so does a busy
        one where waiting gathered no one (one client whose calls cost the loop most of its time): after such a
        wait, the next BACKOFF batches go at once, twice as many each time it happens again."""
        if (self.config.max_queue_delay_s or not self.config.busy_delay_s or not alone
                or self.loop_lag.busy < self.SATURATED):
            return self.config.max_queue_delay_s
        if self._skip:
            self._skip -= 1
            return 0.0
        return self.config.busy_delay_s

    def _learn(self, delay: float, taken: int) -> None:
        """After a batch that waited busy_delay_s: it gathered others (keep waiting), or none (back off)."""
        if delay and not self.config.max_queue_delay_s and delay == self.config.busy_delay_s:
            if taken > 1:
                self._backoff = self.BACKOFF[0]
            else:
                self._skip, self._backoff = self._backoff, min(2 * self._backoff, self.BACKOFF[1])

    def _ready_size(self, key) -> int:
        return self._pending.get(key, 0)

    def _full(self, n: int, tokens: int = 0) -> bool:
        budget = self.config.max_batch_tokens
        return (n >= self.config.max_batch_size or (n in self.config.preferred_batch_sizes and n > 1)
                or (budget is not None and tokens >= budget))

    def _ready(self, key) -> bool:
        """Nothing to gain by waiting: a full batch (its items, or its tokens), or a full queue (no more requests can
        join it)."""
        return (self._full(self._ready_size(key), self._pending_tokens.get(key, 0))
                or len(self.queue) >= self.config.max_queue_requests)

    async def _loop(self) -> None:
        while True:
            while not self.queue:
                if self._stopping:
                    await asyncio.gather(*self._running)
                    return
                self._wake.clear()
                await self._wake.wait()
            oldest, delay = self.queue[0], self._delay(alone=len(self.queue) == 1)
            while not self._stopping:
                pending = self._ready_size(oldest.key)
                remaining = self._dispatch_at(oldest, pending, delay) - time.monotonic()
                if self._ready(oldest.key) or remaining <= 0:
                    break
                self._wake.clear()
                timer = asyncio.get_running_loop().call_later(remaining, self._wake.set)
                try:
                    await self._wake.wait()  # a full batch, the timer, or stop()
                finally:
                    timer.cancel()
            await self._slots.acquire()
            items = self._take(oldest.key)
            if items:  # (none: a full batch left from submit() meanwhile)
                self._learn(delay, len(items))
            if self._inline(items):
                try:
                    await self._run_batch(items, inline=True)  # never suspends: the next batch can go in this turn
                finally:
                    self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(items))
            self._running.add(task)
            task.add_done_callback(self._finished)

    LAGGING_S = 0.01  # past this loop lag, the HTTP side is the bottleneck: batches go at the batcher's own turn

    def _dispatch_now(self, key) -> bool:
        """A full batch (or a full queue) of a model that runs inline goes at once, from the request that filled it,
        rather than at the batcher's next turn, which comes once per pass of the event loop: many connections would
        otherwise meet a full queue the model could have emptied many times over in that pass. Not while the loop
        lags: then requests wait in the sockets, unseen, and the queue filling up is what sheds them (at 2x capacity
        in an open loop, dispatching at once took every request and the p99 to 2 s)."""
        n = self._ready_size(key)
        return (self._ready(key)
                and self.loop_lag.lag < self.LAGGING_S and self._inline_size(min(n, self.config.max_batch_size)))

    async def _run_now(self, key) -> None:
        await self._slots.acquire()  # free (checked): does not suspend
        try:
            await self._run_batch(self._take(key), inline=True)  # never suspends
        finally:
            self._slots.release()

    def _inline(self, items: list[Item]) -> bool:
        return self._inline_size(sum(i.size for i in items))

    def _inline_size(self, size: int) -> bool:
        """Run on the event loop's thread when one runner does the work and the profile says the batch takes under
        ``inline_s``: handing it to a thread costs about 0.1 ms, and under overload each hand-off waits for a turn of
        an event loop busy with the requests coming in, which is what made a 0.1 ms model miss a 50 ms SLO."""
        if self._concurrency > 1 or not self.latency.points:
            return False
        return self.latency.predict(size) <= self.config.inline_s

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    def _take(self, key) -> list[Item]:
        """The oldest requests of ``key`` that fit a batch, in their order (a request that would take the batch past
        ``max_batch_size`` items or ``max_batch_tokens`` tokens waits for the next; one alone always goes)."""
        taken, kept, n, tokens = [], deque(), 0, 0
        budget = self.config.max_batch_tokens or float("inf")
        while self.queue:
            item = self.queue.popleft()
            if item.key == key and (n == 0 or (n + item.size <= self.config.max_batch_size
                                                and tokens + item.tokens <= budget)):
                taken.append(item)
                n += item.size
                tokens += item.tokens
            else:
                kept.append(item)
        self.queue = kept
        self.queued_bytes -= sum(i.nbytes for i in taken)
        for pending, count in ((self._pending, n), (self._pending_tokens, tokens)):
            left = pending.pop(key, 0) - count  # none left when a full batch went from submit() meanwhile
            if left:
                pending[key] = left
        return taken

    async def _run_batch(self, items: list[Item], inline: bool = False) -> None:
        now = time.monotonic()
        live = []
        for item in items:
            if item.future.done():  # the client went away
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded(f"deadline passed after {now - item.enqueued:.3f}s in the queue"))
            else:
                live.append(item)
        if not live:
            return
        self.in_flight += len(live)
        started = time.monotonic()
        self._busy_until = started + self.latency.predict(sum(i.size for i in live))
        try:
            feeds = self._merge(live)
            if inline:
                outputs = self.run(feeds)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, feeds)
            total = sum(i.size for i in live)
            bad = [k for k, v in outputs.items() if len(v) != total]
            if bad:
                raise ModelError(f"the model returned {[len(outputs[k]) for k in bad]} rows for {total} inputs")
            elapsed = time.monotonic() - started
            self.latency.observe(total, elapsed)
            self.on_batch(size=total, requests=len(live), compute_s=elapsed,
                          queue_s=[started - i.enqueued for i in live],
                          tokens=sum(i.tokens for i in live) if self._mask else None)
            start = 0
            for item in live:
                part = {k: self._cut(k, v[start:start + item.size], item) for k, v in outputs.items()}
                start += item.size
                if not item.future.done():
                    item.future.set_result(part)
        except Exception as exc:  # every waiting request gets the error: none may hang
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self.in_flight -= len(live)

    def _merge(self, items: list[Item]) -> dict[str, np.ndarray]:
        if len(items) == 1 and not self.paddable:
            return items[0].feeds
        target = {}
        for item in items:
            for d, n in item.lengths.items():
                target[d] = max(target.get(d, 0), n)
        merged = {}
        for t in self.spec.inputs:
            parts = []
            for item in items:
                a = item.feeds[t.name]
                pads = [(0, 0)] + [(0, target[d] - n) if d in target else (0, 0) for d, n in zip(t.shape[1:], a.shape[1:])]
                parts.append(np.pad(a, pads) if any(p[1] for p in pads) else a)
            merged[t.name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return merged

    def _cut(self, name: str, array: np.ndarray, item: Item) -> np.ndarray:
        spec = next((t for t in self.spec.outputs if t.name == name), None)
        if spec is None or not item.lengths:
            return array
        index = tuple(slice(0, item.lengths[d]) if d in item.lengths else slice(None) for d in spec.shape[1:])
        return array[(slice(None),) + index]
