"""Latency and throughput per batch size, measured after warm-up with the serving thread settings."""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from .spec import IOSpec


def batch_of(spec: IOSpec, pool: Mapping[str, np.ndarray] | None, batch: int, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """``batch`` items: rows of the held-out pool (repeated as needed) or generated from the spec."""
    if pool:
        n = len(next(iter(pool.values())))
        idx = np.arange(batch) % n
        return {k: np.ascontiguousarray(v[idx]) for k, v in pool.items()}
    return spec.sample(batch, dims, seed=batch)


def measure(runner, feeds, *, min_runs: int = 10, max_runs: int = 300, seconds: float = 1.0, warmup: int = 3) -> dict:
    """Median-based latency stats of ``runner(feeds)`` in ms, after ``warmup`` discarded calls."""
    for _ in range(warmup):
        runner(feeds)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() < deadline):
        t0 = time.perf_counter()
        runner(feeds)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "runs": len(ms)}


def profile(runner, spec: IOSpec, batch_sizes, pool=None, dims=None, seconds: float = 1.0) -> dict[int, dict]:
    out = {}
    for bs in batch_sizes:
        try:
            stats = measure(runner, batch_of(spec, pool, bs, dims or {}), seconds=seconds)
        except Exception as exc:  # e.g. batch norm in training mode at batch 1: a row, not a crash
            out[int(bs)] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
            continue
        stats["throughput"] = bs / (stats["p50_ms"] / 1e3)
        out[int(bs)] = stats
    return out
