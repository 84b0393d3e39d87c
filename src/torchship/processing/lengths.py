"""A padded batch run as sub-batches of similar lengths: on real text, padding a batch of mixed lengths to its longest
item is most of a transformer's work (the issue's measure: 3x on docstring sentences at batch 32).

The rows of a batch are sorted by their real length (from the attention mask: right padding) and cut into runs: where
the bundle was timed at several lengths, where the calls' estimated costs add up to least (``priced``); else greedily,
each run's padded size within ``slack`` of its real tokens (at least ``min_rows`` a run, so that each call still
batches). Each run is sliced to its own longest and run, and the outputs put back in the batch's order, padded again to
the batch's length where an output has that dimension. The answer is the same as one padded run: padding positions
are masked, and the model sees each row with less of it.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..spec import IOSpec

Run = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def mask_input(spec: IOSpec) -> tuple[str, tuple[str, ...]] | None:
    """(the attention mask input, the dimensions it pads), where the model takes one."""
    mask = next((t for t in spec.inputs if t.name.endswith("attention_mask") and len(t.shape) == 2), None)
    if mask is None or not isinstance(mask.shape[1], str) or mask.shape[0] != "batch":
        return None
    return mask.name, (mask.shape[1],)


def runs(lengths: np.ndarray, slack: float = 1.25, min_rows: int = 4, max_rows: int | None = None) -> list[np.ndarray]:
    """The rows' indices, longest first, cut into runs: a run grows while its padded size (rows x its longest) stays
    within ``slack`` of its real tokens, or while it has fewer than ``min_rows`` rows."""
    order = np.argsort(-lengths, kind="stable")
    out, start = [], 0
    while start < len(order):
        longest, real, end = int(lengths[order[start]]), 0, start
        while end < len(order) and (max_rows is None or end - start < max_rows):
            n, add = end - start + 1, int(lengths[order[end]])
            if n > min_rows and n * longest > slack * (real + add):
                break
            real += add
            end += 1
        out.append(order[start:end])
        start = end
    return out


PRICED_ROWS = 256  # the most rows one priced run takes


def priced(lengths: np.ndarray, cost: Callable[[int, int], float], max_rows: int | None = None) -> list[np.ndarray]:
    """The rows' indices, longest first, cut where the calls cost least in all: ``cost(rows, length)`` estimates one
    call of ``rows`` rows padded to ``length`` (a bundle's measured costs: ``mix.Costs.pricer``); the cuts are the
    cheapest of all contiguous ones (dynamic programming over the sorted rows), each run at most ``max_rows`` (and at
    most ``PRICED_ROWS``: the work grows with the batch times that, and it runs for every batch)."""
    order = np.argsort(-lengths, kind="stable")
    longest = [int(lengths[i]) for i in order]
    n, cap = len(order), min(max_rows or len(order), PRICED_ROWS)
    best, start = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for first in range(max(0, end - cap), end):
            total = best[first] + cost(end - first, longest[first])
            if total < best[end]:
                best[end], start[end] = total, first
    out, end = [], n
    while end > 0:
        out.append(order[start[end]:end])
        end = start[end]
    return out[::-1]


def by_length(run: Run, spec: IOSpec, slack: float = 1.25, min_rows: int = 4, max_rows: int | None = None,
              cost: Callable[[int, int], float] | None = None) -> Run:
    """``run`` for padded batches as runs of similar lengths, each of at most ``max_rows`` rows (``run`` itself for a
    model without an attention mask): cut where the calls cost least by ``cost`` (``priced``) where the bundle was
    timed at several lengths, else by the ``slack`` rule (``runs``)."""
    found = mask_input(spec)
    if found is None:
        return run
    mask, dims = found
    inputs = {t.name: [i + 1 for i, d in enumerate(t.shape[1:]) if d in dims] for t in spec.inputs}
    outputs = {t.name: [i + 1 for i, d in enumerate(t.shape[1:]) if d in dims] for t in spec.outputs}

    def cut(a: np.ndarray, rows: np.ndarray, axes: list[int], length: int) -> np.ndarray:
        a = a[rows]
        if axes:
            a = a[tuple(slice(None) if i not in axes else slice(0, length) for i in range(a.ndim))]
        return np.ascontiguousarray(a)

    def bucketed(feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        m = np.asarray(feeds[mask])
        if cost is None and len(m) < 2 * min_rows and (max_rows is None or len(m) <= max_rows):
            return run(feeds)
        nonzero = m != 0
        lengths = np.where(nonzero.any(1), m.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 1)
        parts = priced(lengths, cost, max_rows) if cost else runs(lengths, slack, min_rows, max_rows)
        if len(parts) == 1:
            return run(feeds)
        results = []
        for rows in parts:
            length = int(lengths[rows].max())
            results.append(run({k: cut(np.asarray(v), rows, inputs.get(k, []), length) for k, v in feeds.items()}))
        merged = {}
        for name, first in results[0].items():
            axes = outputs.get(name, [])
            shape = list(first.shape)
            shape[0] = len(m)
            for ax in axes:
                shape[ax] = m.shape[1]
            out = np.zeros(shape, dtype=first.dtype)
            for rows, res in zip(parts, results):
                part = np.asarray(res[name])
                out[(rows,) + tuple(slice(0, part.shape[i]) for i in range(1, part.ndim))] = part
            merged[name] = out
        return merged
    return bucketed
