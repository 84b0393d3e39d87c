"""Choose the fastest faithful variant: best throughput at the target batch size, or under a p99 SLO."""
from __future__ import annotations

from typing import Sequence

from .results import VariantResult


def candidates(results: Sequence[VariantResult]) -> list[VariantResult]:
    return [r for r in results if r.ok and r.selectable]


def select(results: Sequence[VariantResult], target_batch_size: int,
           latency_slo_ms: float | None = None) -> tuple[VariantResult, int] | None:
    """Return (result, batch size) or None when no variant is faithful (and, with an SLO, fast enough)."""
    best = None
    for r in candidates(results):
        if latency_slo_ms is None:
            options = [target_batch_size]
        else:
            options = [bs for bs, s in r.profile.items() if s.p99_ms <= latency_slo_ms]
        for bs in options:
            tput = r.throughput(bs)
            if tput is not None and (best is None or tput > best[2]):
                best = (r, bs, tput)
    return (best[0], best[1]) if best else None


def closest(results: Sequence[VariantResult]) -> VariantResult | None:
    """The rejected variant nearest to the budget (highest accuracy where labels gave one, else highest cosine), to
    name when nothing passes."""
    rejected = [r for r in results if r.status == "rejected" and r.selectable and r.fidelity]
    return max(rejected, key=lambda r: (r.fidelity.accuracy or 0.0, r.fidelity.cosine), default=None)
