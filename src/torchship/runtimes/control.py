"""int8 with accuracy control, for any runtime whose toolkit can leave operations out of int8: what a candidate keeps
of the budget's floors (``Control``), how many of the costliest operations stay in float (``least_in_float``), and
whether the rest is worth a variant of its own (``int8_bound``). A runtime brings how it compiles a candidate and how
it quantizes with some operations left out; ``openvino`` (NNCF), ``onnxrt`` (ONNX Runtime's QDQ) and ``eager``
(torch.ao's dynamic int8) use it."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import BuildSkipped
from ..mix import least_padding
from ..similarity import cosines, extra_cosine, retrieval
from .base import calibration_batches

MIXED_MARGIN = 0.3  # each floor is kept on the calibration data with this share of the room above it spare
RANKING_ITEMS = 64  # what each operation costs is measured on the first this many calibration items (as NNCF's own
# accuracy control ranks on a subset): one measurement per operation, and the ranking needs no more; whether a layout
# holds is measured on them all
DEFAULT_FLOOR = 0.999  # the default budget's cosine floor
MIXED_GAIN = 1.1  # a layout that cannot gain this much over its float precision alone is not built: that variant
# is the same model at that precision, already a row of its own, and runs of one machine differ by more than this


def spare(floor: float) -> float:
    """A floor with ``MIXED_MARGIN`` of the room above it spare."""
    return floor + MIXED_MARGIN * (1 - floor)


def measures(kept: dict[str, float]) -> str:
    return ", ".join(f"{'raw input, worst item' if k == 'raw' else k} {v:.4f}" for k, v in kept.items() if k != "raw floor")


def layout(order: list[str], hi: int, precision: str, kept: dict[str, float], what: str, how: str = "",
           names: Callable[[list[str]], str] = ", ".join) -> str:
    """A mixed layout in words: ``order`` (costliest first) with the first ``hi`` in ``precision``, naming whichever
    list is shorter, and what it ``kept``."""
    named = (f"in {precision}, costliest first: {names(order[:hi])}" if hi <= len(order) - hi else
             f"those: {names(order[hi:])}; the other {hi} in {precision}")
    return f"int8 on {len(order) - hi} of the {len(order)} {what}{how}; {named} ({measures(kept)})"


def by_length(feeds: dict[str, np.ndarray], groups: int = 3) -> list[tuple[np.ndarray, dict[str, np.ndarray], int]]:
    """Raw input as a few groups of items of neighbouring lengths, each cut to its longest (a text longer than the
    model takes would pad all the others to its length, and accuracy control runs raw input some fifty times):
    (the items' places, their inputs, the width of the whole). One group where the inputs are not all (items, tokens)
    with a mask whose padding is at the end."""
    mask = feeds.get("attention_mask")
    whole = [(np.arange(len(next(iter(feeds.values())))), feeds, 0 if mask is None else mask.shape[-1])]
    if mask is None or mask.ndim != 2 or any(a.shape != mask.shape for a in feeds.values()):
        return whole
    lengths = np.maximum(mask.sum(1).astype(int), 1)
    if not all(mask[i, :n].all() for i, n in enumerate(lengths)):
        return whole
    sizes, counts = np.unique(lengths, return_counts=True)
    found, low = [], 0
    for size in sorted(least_padding(sizes.tolist(), (counts / len(lengths)).tolist(), groups)):
        index = np.flatnonzero((lengths > low) & (lengths <= size))
        found.append((index, {k: np.ascontiguousarray(v[index, :size]) for k, v in feeds.items()}, mask.shape[1]))
        low = size
    return found


def _in_batches(groups, batch: int):
    """``by_length``'s groups split into batches of at most ``batch`` items (the calibration batches' size)."""
    return [(index[i:i + batch], {k: v[i:i + batch] for k, v in feeds.items()}, width)
            for index, feeds, width in groups for i in range(0, len(index), batch)]


def _placed(run, groups) -> np.ndarray:
    """``run`` on each of ``groups`` (``by_length``'s: the items' places, their inputs, the width of the whole), each
    output in its items' places; an output per token has its padding zeroed, and is as wide as the whole."""
    whole = None
    for index, feeds, width in groups:
        out = run(feeds)
        mask = feeds.get("attention_mask")
        if mask is not None and out.ndim == 3 and out.shape[:2] == mask.shape:
            out = np.pad(out * mask[..., None], ((0, 0), (0, max(0, width - out.shape[1])), (0, 0)))
        if whole is None:
            whole = np.zeros((sum(len(i) for i, _, _ in groups),) + out.shape[1:])
        if out.shape[1:] != whole.shape[1:]:
            raise _Misfit
        whole[index] = out
    return whole


class _Misfit(Exception):
    """Groups cut to other lengths gave outputs of other shapes."""


def _joined(batches: list[dict[str, np.ndarray]]) -> tuple[int, dict[str, np.ndarray]]:
    """(the batches' size, all their items as one set of inputs)."""
    return len(next(iter(batches[0].values()))), {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def cut_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Calibration batches of token inputs as batches of the same size of items of neighbouring lengths, cut to their
    longest (``by_length``); others as they are."""
    size, items = _joined(batches)
    return [feeds for _, feeds, _ in _in_batches(by_length(items), size)]


class Control:
    """What accuracy control measures a candidate by: its first output on the calibration inputs against the float
    model's, as the budget's floors say (mean cosine, retrieval), and on raw input through the bundle's pipeline
    where the model takes some (``Source.raw_data``), item by item: the worst item's cosine at least the floor the
    search will hold it to there (``optimize.raw.floor``: the budget's cosine, else the one its own relative error
    allows), all run at the precision it will run at. ``ranking``: on the first ``RANKING_ITEMS`` calibration
    items only, what ranking the operations by cost measures on. Token inputs run cut to their items' lengths, in
    groups of neighbouring lengths (``by_length``: MiniLM's calibration sentences, at most 23 tokens of 128, ran
    some fifty times padded). A runtime gives ``compiled``."""

    def __init__(self, reference, model, options, precision: str):
        self.spec, self.names, self.precision = model.spec, model.spec.input_names, precision
        size, items = _joined(calibration_batches(model))
        self.ranks_on_all = len(next(iter(items.values()))) <= RANKING_ITEMS  # then a measure on them is the full one
        self.floors = options.floors or {"cosine": DEFAULT_FLOOR}  # the default budget's floor
        self.targets = {k: spare(v) for k, v in self.floors.items()}
        raw = getattr(model, "raw_data", None) or {}
        for groups in (3, 1):  # 1: all cut to the longest (an output as wide as the tokens, not one per token)
            self.batches = _in_batches(by_length(items, groups), size)
            self.ranking = _in_batches(by_length({k: v[:RANKING_ITEMS] for k, v in items.items()}, groups), size)
            self.raw = by_length(raw, groups) if raw else []
            try:
                self.reference, self.raw_reference = self.outputs(reference, "fp32")
                break
            except _Misfit:
                if groups == 1:
                    raise
        self.ranking_reference = self.reference if self.ranks_on_all else self.outputs(reference, "fp32", True)[0]

    def compiled(self, candidate, precision: str) -> Callable[[list[np.ndarray]], np.ndarray]:
        """``candidate`` ready to run at ``precision``: the inputs in the spec's order -> its first output."""
        raise NotImplementedError

    def outputs(self, candidate, precision: str, ranking: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The first output on the calibration inputs (the first ``RANKING_ITEMS`` where ``ranking``), and on the raw
        input (None without), each item in its place: padded tokens zeroed."""
        compiled = self.compiled(candidate, precision)
        run = lambda b: np.asarray(compiled([b[n] for n in self.names]), dtype=np.float64)  # noqa: E731
        return _placed(run, self.ranking if ranking else self.batches), _placed(run, self.raw) if self.raw else None

    def kept(self, candidate, ranking: bool = False) -> dict[str, float]:
        """What ``candidate`` keeps of each floor's measure on the calibration data, and on raw input the worst
        item's cosine (``raw``) with the floor it must keep (``raw floor``)."""
        out, raw = self.outputs(candidate, self.precision, ranking)
        reference = self.ranking_reference if ranking else self.reference
        found = {"cosine": float(cosines(reference, out).mean())}
        if "retrieval" in self.targets:
            r = retrieval(reference, out)
            found["retrieval"] = r[0] if r else found["cosine"]
        if raw is not None:
            found["raw"] = float(cosines(self.raw_reference.reshape(len(raw), -1), raw.reshape(len(raw), -1)).min())
            own = float(np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-30))
            found["raw floor"] = self.floors.get("cosine", extra_cosine(own))
        return found

    def on_ranking(self, candidate, kept: dict[str, float]) -> dict[str, float]:
        """What ``candidate`` keeps on the ranking items, given what it ``kept`` on all (the same where they are all)."""
        return kept if self.ranks_on_all else self.kept(candidate, ranking=True)

    def room(self, kept: dict[str, float]) -> float:
        """The least room above a target of what a model ``kept`` (>= 0: every floor holds with the margin)."""
        room = min(kept[k] - t for k, t in self.targets.items())
        return min(room, kept["raw"] - spare(kept["raw floor"])) if "raw" in kept else room


def shares(sizes: dict[str, int], names: list[str]) -> dict[str, float]:
    """Each of ``names``' share of their total ``sizes`` (the weights of an operation's matrices: what its FLOPs per
    item scale with; 0 for one without)."""
    total = sum(sizes.get(n, 0) for n in names) or 1
    return {n: sizes.get(n, 0) / total for n in names}


def fewest(most: int, holds: Callable[[int], bool], start: int = 2) -> int | None:
    """The least k in 1..``most`` for which ``holds(k)`` (taken to stay true above it), or None: ``start``, then
    doubling until it holds, then bisection between the last that failed and the first that held (each call a
    quantization, so as few as that)."""
    lo, hi, k = 0, None, start
    while hi is None and lo < most:
        k = min(k, most)
        if holds(k):
            hi = k
        else:
            lo, k = k, 2 * k
    if hi is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


def int8_bound(share: float, precision: str) -> float:
    """The most a model gains over ``precision`` alone with ``share`` of its matrix work in int8 (Amdahl, with the
    generous bounds of ``transforms.GAINS`` on this CPU)."""
    from ..machine import cpu
    from ..transforms import most_gain
    flags = cpu()[1]
    gain = most_gain("int8", flags) / (most_gain("bf16", flags) if precision == "bf16" else 1.0)  # per layer
    return 1.0 / ((1.0 - share) + share / gain)


def _floor2(x: float) -> str:
    """``x`` to two decimals, rounded down (a bound of 1.0997 under 1.1 reads 1.09x, not 1.10x)."""
    return f"{math.floor(x * 100) / 100:.2f}"


def least_in_float(order: list[str], share: dict[str, float], precision: str, holds: Callable[[int], bool],
                   control: Control, full_kept: dict[str, float], label: str) -> int:
    """How many of ``order`` (costliest first) stay in float: the fewest for which ``holds`` (a quantization with
    them left out), among the layouts whose int8 could still gain ``MIXED_GAIN`` over ``precision`` alone (Amdahl
    over ``share``, each operation's share of the matrix weights); else ``BuildSkipped`` saying why. Under a fixed
    cosine floor the least int8 is tried first: where even that misses the floors (raw input often does), one
    quantization says so. Not under a task-metric budget: raw input's floor there follows the candidate's own error,
    which shrinks as more stays in float, so holding is not monotone in how many do."""
    left = lambda k: sum(share[n] for n in order[k:])  # noqa: E731
    # the most that may stay in float: every one would be no int8 at all, and fewer than that where the rest would
    # leave int8 too little of the matrix work to gain MIXED_GAIN over the float precision alone
    most = max((k for k in range(len(order)) if int8_bound(left(k), precision) >= MIXED_GAIN), default=-1)
    hi = None if most < 1 else fewest(most, holds) if "cosine" not in control.floors or holds(most) else None
    if hi is not None:
        return hi
    floors = ", ".join(f"{name} {v:g}" for name, v in control.floors.items())
    raw = " and on raw input, item by item" if control.raw else ""
    if most == len(order) - 1:
        raise BuildSkipped(f"{label}: every operation int8 reaches would have to stay in float to keep {floors} on the "
                           f"calibration data{raw} (all in int8: {measures(full_kept)}); no int8 left to gain from")
    more = max(0, most) + 1  # the fewest that would have to stay in float
    raise BuildSkipped(f"{label}: to keep {floors} on the calibration data{raw}, at least {more} of the {len(order)} "
                       f"operations int8 reaches would have to stay in float; int8 would then keep {left(more):.0%} of "
                       f"the matrix weights, at most {_floor2(int8_bound(left(more), precision))}x over {precision} "
                       f"alone, under the {MIXED_GAIN:g}x worth a variant of its own (all in int8: "
                       f"{measures(full_kept)})")
