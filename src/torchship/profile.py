"""Latency and throughput per batch size, measured after warm-up with the serving thread settings."""
from __future__ import annotations

import bisect
import time
from typing import Mapping

import msgspec
import numpy as np

from .errors import first_line
from .spec import IOSpec


class Stats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One batch size's timing: latency percentiles of single calls, throughput at the median, and the interval of
    the median over the rounds it was timed in (see ``torchship.measure``)."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    throughput: float  # items per second at the median latency
    lo_ms: float | None = None  # the interval of the median latency ...
    hi_ms: float | None = None
    rounds: int = 1  # ... over this many rounds

    @property
    def throughput_interval(self) -> tuple[float, float]:
        """(slow end, fast end) of the throughput, from the latency interval."""
        if self.lo_ms is None or self.hi_ms is None:
            return self.throughput, self.throughput
        return self.throughput * self.p50_ms / self.hi_ms, self.throughput * self.p50_ms / self.lo_ms

    @property
    def estimate(self):
        from .measure import Estimate
        return Estimate(self.p50_ms / 1e3, (self.lo_ms or self.p50_ms) / 1e3, (self.hi_ms or self.p50_ms) / 1e3,
                        self.rounds, self.runs)


def interpolate(points: Mapping[int, float], x: int, sizes: list[int] | None = None) -> float:
    """A cost at ``x`` from costs measured at some sizes: linear between them, the smallest's below them, proportional
    past the largest (plain Python, no array: the batcher calls it for every batch). ``sizes``: ``sorted(points)``,
    where the caller keeps it."""
    sizes = sizes if sizes is not None else sorted(points)
    if not sizes:
        return 0.0
    if x in points:
        return points[x]
    i = bisect.bisect_left(sizes, x)
    if i == 0:
        return points[sizes[0]]
    if i == len(sizes):
        return points[sizes[-1]] * x / sizes[-1]
    lo, hi = sizes[i - 1], sizes[i]
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


def batch_of(spec: IOSpec, pool: Mapping[str, np.ndarray] | None, batch: int, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """``batch`` items: rows of the held-out pool (repeated as needed) or generated from the spec."""
    if pool:
        n = len(next(iter(pool.values())))
        idx = np.arange(batch) % n
        return {k: np.ascontiguousarray(v[idx]) for k, v in pool.items()}
    return spec.sample(batch, dims, seed=batch)


def stats(batch: int, rounds: list[list[float]] | list[float]) -> Stats:
    """Stats from the seconds of every call, per round (or one flat list: a single round)."""
    from .measure import estimate
    rounds = [list(r) for r in rounds] if rounds and isinstance(rounds[0], (list, tuple)) else [list(rounds)]
    ms = np.concatenate([np.asarray(r, dtype=float) for r in rounds if len(r)]) * 1e3
    e = estimate(rounds)
    p50 = e.median * 1e3
    return Stats(p50, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)), float(ms.mean()), len(ms),
                 batch / e.median, e.lo * 1e3, e.hi * 1e3, e.rounds)


def measure(runner, feeds, *, min_runs: int = 10, max_runs: int = 300, seconds: float = 1.0, warmup: int = 3,
            clock=time.perf_counter) -> list[float]:
    """Seconds per call of ``runner(feeds)``, after ``warmup`` discarded calls."""
    for _ in range(warmup):
        runner(feeds)
    times = []
    deadline = clock() + seconds
    while len(times) < min_runs or (len(times) < max_runs and clock() < deadline):
        t0 = clock()
        runner(feeds)
        times.append(clock() - t0)
    return times


def profile(runner, spec: IOSpec, batch_sizes, pool=None, dims=None, seconds: float = 1.0) -> tuple[dict[int, Stats], dict[int, str]]:
    """(stats per batch size, the error at each batch size the model cannot run)."""
    out, errors = {}, {}
    for bs in batch_sizes:
        try:
            out[int(bs)] = stats(bs, measure(runner, batch_of(spec, pool, bs, dims or {}), seconds=seconds))
        except Exception as exc:  # e.g. batch norm in training mode at batch 1: a row, not a crash
            errors[int(bs)] = first_line(exc, 200)
    return out, errors


def median_s(runner, feeds, **kw) -> float:
    """The median seconds of one call of ``runner(feeds)`` (see ``measure``)."""
    return float(np.median(measure(runner, feeds, **kw)))
