"""The lengths a model is timed at: where a dimension is dynamic (a text model's ``seq``), the search times every
contender at the sizes users send, not only at the example's, and chooses on that mix.

The mix comes from ``--lengths seq=16,32,64`` (or a range, ``seq=16..128``: powers of two within it, each weighed
alike), or else from the verification inputs: the real lengths of the items (an attention mask's ones), each rounded
up to a multiple of 8, put into at most four groups of neighbouring lengths, each group timed at its longest (a batch
of similar lengths is padded to its longest, as the server's batcher runs them) and weighed by its share of the items.
The groups are the ones that pad least (a few long items keep a group of their own rather than lengthening a big
one). Nothing here imports torch, and nothing measures: the worker times a mix (``job.Variant.time``), ``cut`` makes
its batches.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import msgspec
import numpy as np

from .errors import UsageError
from .profile import interpolate
from .spec import IOSpec

GROUPS = 4  # at most this many lengths from the data: each one costs a timed call per round
ROUND_TO = 8


class Mix(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sizes of one dynamic dimension and their shares of the traffic: a batch of the mix costs the weighed sum of a
    batch at each size."""

    dim: str
    sizes: tuple[int, ...]
    weights: tuple[float, ...]  # shares, summing to 1
    source: str  # where the sizes come from, in words

    def describe(self) -> str:
        shares = ", ".join(f"{s} ({w:.0%})" for s, w in zip(self.sizes, self.weights))
        return f"{self.dim} {shares}: {self.source}"


def parse(text: str | None) -> dict[str, tuple[int, ...]] | None:
    """``seq=16,32,64`` or ``seq=16..128`` -> ``{"seq": (16, 32, 64)}``; ``example`` -> ``{}`` (only the example's
    sizes are timed); None -> None (found from the data)."""
    if text is None:
        return None
    if text.strip() == "example":
        return {}
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*\.\.\s*(\d+)\s*", text)
    if m:
        lo, hi = int(m.group(2)), int(m.group(3))
        if not 1 <= lo <= hi:
            raise UsageError(f"--lengths {text}: a range low..high needs 1 <= low <= high")
        sizes, s = [], lo
        while s < hi:
            sizes.append(s)
            s *= 2
        return {m.group(1): tuple(sizes + [hi])}
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+(?:\s*,\s*\d+)*)\s*", text)
    if not m:
        raise UsageError(f"--lengths {text!r}: write DIM=N,N,... (seq=16,32,64), DIM=LOW..HIGH (seq=16..128) or example")
    sizes = tuple(sorted({int(x) for x in m.group(2).split(",")}))
    if sizes[0] < 1:
        raise UsageError(f"--lengths {text}: sizes must be positive")
    return {m.group(1): sizes}


def served_mix(spec: IOSpec, inputs: Mapping[str, np.ndarray], given: dict[str, tuple[int, ...]] | None) -> Mix | None:
    """The mix to time at, or None: only the example's sizes (no dynamic dimension, ``--lengths example``, or data
    whose items all have the example's length)."""
    if given is not None:
        if not given:
            return None
        if len(given) > 1:
            raise UsageError(f"--lengths names one dimension, got {', '.join(given)}")
        (dim, sizes), = given.items()
        if dim not in spec.symbols:
            raise UsageError(f"--lengths {dim}=...: {dim!r} is not a dynamic dimension of the model's inputs "
                             f"(they have {', '.join(spec.symbols) or 'none but batch'})")
        return Mix(dim, sizes, tuple(1.0 / len(sizes) for _ in sizes), "given with --lengths, each weighed alike")
    from .processing.lengths import mask_input
    found = mask_input(spec)  # the server's batcher finds the mask the same way
    if found is None or found[0] not in inputs:
        return None
    name, (dim,) = found
    lengths = np.sort(np.asarray(inputs[name]).astype(bool).sum(axis=1))
    lengths = lengths[lengths > 0]
    if not len(lengths) or lengths.min() == inputs[name].shape[1]:
        return None  # no padding: the items have the example's length
    rounded = np.minimum(-(-lengths // ROUND_TO) * ROUND_TO, inputs[name].shape[1])
    values, counts = np.unique(rounded, return_counts=True)
    sizes = least_padding([int(v) for v in values], [c / len(lengths) for c in counts], GROUPS)
    return Mix(dim, tuple(sizes), tuple(sizes.values()),
               f"the token counts of the {len(lengths)} verification items ({name}), rounded up to {ROUND_TO}, in "
               f"{len(sizes)} group(s) each at its longest")


def least_padding(sizes: list[int], shares: list[float], groups: int) -> dict[int, float]:
    """``sizes`` (ascending) with their ``shares`` put into at most ``groups`` runs of neighbours, each at its largest
    size: the runs whose padded total (share x size, summed) is least. {size: share of its run}."""
    n = len(sizes)
    cum = np.concatenate([[0.0], np.cumsum(shares)])
    best = {(0, 0): (0.0, ())}  # (items placed, runs used) -> (padded total, the runs' ends)
    for used in range(1, groups + 1):
        for end in range(1, n + 1):
            options = [(best[(start, used - 1)][0] + (cum[end] - cum[start]) * sizes[end - 1],
                        best[(start, used - 1)][1] + (end,)) for start in range(end) if (start, used - 1) in best]
            if options:
                best[(end, used)] = min(options)
    _, ends = min(best[(n, used)] for used in range(1, groups + 1) if (n, used) in best)
    out, start = {}, 0
    for end in ends:
        out[sizes[end - 1]] = float(cum[end] - cum[start])
        start = end
    return out


def cut(spec: IOSpec, feeds: Mapping[str, np.ndarray], dim: str, size: int) -> dict[str, np.ndarray]:
    """``feeds`` at ``size`` along ``dim``: cut, or repeated to reach it; an input whose values follow the dimension
    (a range like ``{1:seq+1}``) is kept within its range at the new size."""
    out = {}
    for t in spec.inputs:
        a = feeds[t.name]
        for axis, d in enumerate(t.shape):
            if d == dim:
                a = np.take(a, np.arange(size) % a.shape[axis], axis=axis)
        out[t.name] = np.ascontiguousarray(a)
    sizes = {d: out[t.name].shape[i] for t in spec.inputs for i, d in enumerate(t.shape) if isinstance(d, str)}
    for t in spec.inputs:
        if t.range is not None and t.tied:
            low, high = t.bounds(sizes)
            out[t.name] = np.clip(out[t.name], low, high - 1)
    return out


class Costs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a batch of the chosen variant cost at each size of the mix it was timed on (a bundle's manifest keeps it:
    the cost of a batch by its padded length, for a batcher to weigh)."""

    mix: Mix
    batch: int
    ms: dict[int, float]  # the median milliseconds of one batch of ``batch`` items at each size

    @property
    def per_token_ms(self) -> float | None:
        """The cost of one more token position per item, from the smallest to the largest size (None: one size)."""
        lo, hi = min(self.ms), max(self.ms)
        return (self.ms[hi] - self.ms[lo]) / (hi - lo) / self.batch if hi > lo else None

    def at(self, length: int) -> float:
        """A batch's milliseconds at ``length``: linear between the timed sizes, proportional past the longest, the
        shortest's below it."""
        return interpolate(self.ms, length)

    def pricer(self, profile: Mapping[int, Any]) -> Callable[[int, int], float] | None:
        """(rows, length) -> the estimated milliseconds of one call: a batch of ``batch`` items at that length
        (``at``), scaled by what ``rows`` cost against ``batch`` in ``profile`` (the bundle's per-batch-size timings:
        ``Stats`` with ``p50_ms``; interpolated as ``at``). None where either has fewer than two sizes: then a call's
        fixed cost cannot be told from its per-row cost."""
        points = {int(k): float(v.p50_ms) for k, v in profile.items()}
        if len(points) < 2 or len(self.ms) < 2:
            return None
        at = functools.lru_cache(maxsize=4096)(self.at)
        rows_ms = functools.lru_cache(maxsize=4096)(lambda rows: interpolate(points, rows))
        full = rows_ms(self.batch)
        return lambda rows, length: at(length) * rows_ms(rows) / full
