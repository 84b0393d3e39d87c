"""A load tool for any Open Inference Protocol server: closed-loop concurrency sweeps and open-loop rates.

Bounded in time and in request count; reports throughput, p50/p90/p99, errors by status, and the
server's average batch size read from its /metrics (torchship's counters) where it has them.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import TorchshipError, UsageError
from .serve.protocol import HEADER, TO_NUMPY

if TYPE_CHECKING:
    import httpx


@dataclass
class PerfRow:
    mode: str  # "concurrency N" or "rate R/s"
    requests: int
    ok: int
    errors: dict
    throughput: float  # successful requests per second
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    avg_batch: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _base(url: str) -> str:
    return url if url.startswith("http") else f"http://{url}"


def make_request(meta: dict, batch: int, dims: dict[str, int], binary: bool, seed: int = 0) -> tuple[bytes, dict]:
    """A request body for the model's metadata: random data, JSON or binary tensors."""
    rng = np.random.default_rng(seed)
    inputs, chunks = [], []
    for i in meta["inputs"]:
        shape = [batch if n == 0 and d == -1 else (d if d != -1 else dims.get("seq", 16)) for n, d in enumerate(i["shape"])]
        dtype = TO_NUMPY.get(i["datatype"])
        if dtype is None:
            raise UsageError(f"input {i['name']}: datatype {i['datatype']} is not supported by torchship perf")
        if dtype.startswith("float"):
            a = rng.standard_normal(shape).astype(dtype)
        elif "mask" in i["name"] or dtype == "bool":
            a = np.ones(shape, dtype)
        else:
            a = rng.integers(0, 100, shape).astype(dtype)
        entry = {"name": i["name"], "shape": shape, "datatype": i["datatype"]}
        if binary:
            entry["parameters"] = {"binary_data_size": a.nbytes}
            chunks.append(a.tobytes())
        else:
            entry["data"] = a.reshape(-1).tolist()
        inputs.append(entry)
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": binary}}).encode()
    headers = {HEADER: str(len(head)), "content-type": "application/octet-stream"} if binary else {"content-type": "application/json"}
    return head + b"".join(chunks), headers


def _counters(client: httpx.Client, base: str, model: str) -> tuple[float, float] | None:
    import httpx
    try:
        text = client.get(f"{base}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    if "torchship_inference_count" not in text:
        return None  # not a torchship server: no batch figures
    got = {"torchship_inference_count_total": 0.0, "torchship_execution_count_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in got and f'model="{model}"' in line:
            got[name] += float(line.rsplit(" ", 1)[1])
    return got["torchship_inference_count_total"], got["torchship_execution_count_total"]


MAX_OPEN = 512  # open-loop: connections in flight at most (file descriptors are finite)


class _Connection:
    """A minimal HTTP/1.1 keep-alive client: far less overhead per request than a general client, so that
    one Python process can offer thousands of requests per second."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, headers: dict) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body)
        try:
            status = int((await self.reader.readline()).split()[1])
            length, chunked, close = 0, False, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                length = int(value) if name == "content-length" else length
                chunked |= name == "transfer-encoding" and "chunked" in value
                close |= name == "connection" and value == "close"
            if chunked:
                while (size := int((await self.reader.readline()).strip() or b"0", 16)):
                    await self.reader.readexactly(size + 2)
                await self.reader.readline()
            else:
                await self.reader.readexactly(length)
        except (IndexError, ValueError, asyncio.IncompleteReadError) as exc:
            self.close()
            raise ConnectionError("the server closed the connection mid-response") from exc
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def arrivals(rate: float, poisson: bool, duration: float, max_requests: int, seed: int = 0) -> list[float]:
    """When an open loop sends its requests, in seconds from its start: every 1/rate, or a Poisson process of that
    rate (exponential gaps, a fixed seed: the same schedule every run), up to ``duration`` and ``max_requests``."""
    rng, at, out = random.Random(seed), 0.0, []
    while at < duration and len(out) < max_requests:
        out.append(at)
        at += rng.expovariate(rate) if poisson else 1.0 / rate
    return out


async def _run(url: str, body: bytes, headers: dict, *, concurrency: int | None, rate: float | None, poisson: bool,
               duration: float, max_requests: int) -> tuple[list[float], dict, int, float]:
    """Latencies of the successes (ms), errors by kind, requests sent, and the seconds the run took (less than
    ``duration`` when ``max_requests`` ended it)."""
    import httpx
    parsed = httpx.URL(url)
    latencies, errors, sent = [], {}, 0
    start = time.monotonic()
    stop = start + duration
    idle: list[_Connection] = []

    async def one():
        conn = idle.pop() if idle else _Connection(parsed.host, parsed.port or 80)
        t0 = time.perf_counter()
        try:
            key = await asyncio.wait_for(conn.post(parsed.raw_path.decode(), body, headers), 30)
        except (OSError, asyncio.TimeoutError) as exc:
            conn.close()
            key = type(exc).__name__
        if key == 200:
            latencies.append((time.perf_counter() - t0) * 1e3)
        else:
            errors[str(key)] = errors.get(str(key), 0) + 1
        idle.append(conn)

    if concurrency:
        async def worker():
            nonlocal sent
            while time.monotonic() < stop and sent < max_requests:
                sent += 1
                await one()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        tasks, in_flight = [], [0]

        async def counted():
            in_flight[0] += 1
            try:
                await one()
            finally:
                in_flight[0] -= 1
        for at in arrivals(rate, poisson, duration, max_requests):
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight[0] >= MAX_OPEN:  # the client's own limit: counted, never sent
                errors["not sent (client at its connection limit)"] = errors.get("not sent (client at its connection limit)", 0) + 1
            else:
                tasks.append(asyncio.ensure_future(counted()))
            sent += 1
        await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return latencies, errors, sent, time.monotonic() - start


def _loop_run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def perf(url: str, model: str, *, concurrency: list[int] | None = None, rate: float | None = None, poisson: bool = False,
         duration: float = 5.0, batch: int = 1, dims: dict[str, int] | None = None, binary: bool = True,
         max_requests: int = 100_000) -> list[PerfRow]:
    """Load ``model`` at ``url``: one row per concurrency level (closed loop), or one row at ``rate`` req/s (open loop)."""
    if rate is not None and rate <= 0:
        raise UsageError(f"--rate must be positive, got {rate}")
    if duration <= 0 or duration > 3600:
        raise UsageError(f"--duration must be between 0 and 3600 seconds, got {duration}")
    base = _base(url)
    import httpx
    with httpx.Client() as c:
        try:
            r = c.get(f"{base}/v2/models/{model}", timeout=10)
        except httpx.HTTPError as exc:
            raise TorchshipError(f"cannot reach {base}: {exc}") from exc
        if r.status_code != 200:
            raise TorchshipError(f"{base}/v2/models/{model} answered {r.status_code}: {r.text[:200]}")
        body, headers = make_request(r.json(), batch, dims or {}, binary)
        target = f"{base}/v2/models/{model}/infer"
        modes = [("rate", rate)] if rate else [("concurrency", n) for n in (concurrency or [1, 2, 4, 8])]
        rows = []
        for kind, value in modes:
            before = _counters(c, base, model)
            lat, errors, sent, took = _loop_run(_run(target, body, headers, concurrency=value if kind == "concurrency" else None,
                                                 rate=value if kind == "rate" else None, poisson=poisson,
                                                 duration=duration, max_requests=max_requests))
            after = _counters(c, base, model)
            avg = None
            if before and after and after[1] > before[1]:
                avg = (after[0] - before[0]) / (after[1] - before[1])
            pct = np.percentile(lat, [50, 90, 99]).tolist() if lat else [None] * 3
            label = f"rate {value:g}/s{' poisson' if poisson else ''}" if kind == "rate" else f"concurrency {value}"
            rows.append(PerfRow(label, sent, len(lat), errors, len(lat) / max(took, 1e-9), *pct, avg))
    return rows
