"""Choose the fastest faithful variant: best throughput at the target batch size, or under a p99 SLO."""
from __future__ import annotations


def _stats(result, bs):
    return (result.get("profile") or {}).get(str(bs)) or {}


def candidates(results: list[dict]) -> list[dict]:
    return [r for r in results if r["status"] == "ok" and r["selectable"]]


def select(results: list[dict], target_batch_size: int, latency_slo_ms: float | None = None) -> tuple[dict, int] | None:
    """Return (result, batch size) or None when no variant is faithful (and, with an SLO, fast enough)."""
    best = None
    for r in candidates(results):
        if latency_slo_ms is None:
            options = [target_batch_size]
        else:
            options = [int(bs) for bs, s in (r.get("profile") or {}).items() if s.get("p99_ms", float("inf")) <= latency_slo_ms]
        for bs in options:
            tput = _stats(r, bs).get("throughput")
            if tput is not None and (best is None or tput > best[2]):
                best = (r, bs, tput)
    return (best[0], best[1]) if best else None


def closest(results: list[dict]) -> dict | None:
    """The rejected variant nearest to the budget (highest accuracy where labels gave one, else highest cosine), to
    name when nothing passes."""
    rejected = [r for r in results if r["status"] == "rejected" and r["selectable"] and r.get("fidelity")]
    return max(rejected, key=lambda r: (r["fidelity"].get("accuracy") or 0.0, r["fidelity"]["cosine"]), default=None)
