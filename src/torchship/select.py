"""Choose the fastest faithful variant: best throughput at the target batch size, or under a p99 SLO.

Figures carry intervals (``torchship.measure``). Two variants timed in the same interleaved rounds are compared on
their paired ratio, round by round (what a round shares cancels): one is faster only when the interval of that ratio
lies above ``measure.MIN_GAIN`` (1.02: a smaller gain does not survive from one run to the next); otherwise (no
shared rounds) when their own intervals do not overlap. Every variant within the noise of the fastest ties with it,
and a tie goes to the simpler one:
uncompressed before compressed, then the runtime with fewer moving parts where it serves, then the faster to load,
then the smaller. The decision says all of this in words.
"""
from __future__ import annotations

import math
from typing import Sequence

import msgspec

from .measure import MIN_GAIN, paired
from .results import VariantResult
from .runtimes.base import DESCRIPTORS

# fewer moving parts at serving time first: one self-contained file and no Python code to import, then compiled
# programs, then the user's Python code (eager), then code compiled again at every load (torch.compile): each
# runtime's descriptor gives its rank and its words
SIMPLICITY = tuple(sorted(DESCRIPTORS, key=lambda r: DESCRIPTORS[r].simplicity))
WHAT = {r: d.what for r, d in DESCRIPTORS.items()}
APART = 1.1  # the figures' own ratio is said beside the shared rounds' where the two differ by more than this


class Decision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    chosen: str
    batch: int
    throughput: float  # items/s at the median
    interval: tuple[float, float]  # its slow and fast ends
    fastest: str  # the highest median; the chosen one unless they tie and the chosen one is simpler
    tied: tuple[str, ...]  # the others within the noise of the fastest
    runner_up: str | None  # the best other variant
    runner_up_throughput: float | None
    runner_up_interval: tuple[float, float] | None
    margin: float | None  # chosen / runner-up: round by round where they shared rounds, else at the medians
    beyond_noise: bool  # the chosen one is faster than the runner-up beyond the noise
    why: str
    paired: tuple[float, float, float] | None = None  # the runner-up's time over the chosen one's, round by round:
    paired_rounds: int | None = None  # median, interval; over this many shared rounds


def candidates(results: Sequence[VariantResult]) -> list[VariantResult]:
    return [r for r in results if r.ok and r.selectable]


def simplicity(r: VariantResult) -> tuple:
    rank = SIMPLICITY.index(r.runtime) if r.runtime in SIMPLICITY else len(SIMPLICITY)
    return (r.compressed, rank, round(r.cold_start_s or 0.0, 1), r.artifact_bytes or 0)


def _options(results, target: int, latency_slo_ms: float | None) -> list[tuple[VariantResult, int]]:
    out = []
    for r in candidates(results):
        sizes = [target] if latency_slo_ms is None else [bs for bs, s in r.profile.items() if s.p99_ms <= latency_slo_ms]
        out += [(r, bs) for bs in sizes if bs in r.profile]
    return out


def ratio(a: tuple[VariantResult, int], b: tuple[VariantResult, int]):
    """``b``'s time a batch over ``a``'s, paired round by round (an Estimate), where both were timed at the same
    batch size in the same interleaved rounds; else None."""
    if a[1] != b[1]:
        return None
    ra, rb = a[0].samples.get(a[1]), b[0].samples.get(b[1])
    return paired(ra, rb) if ra and rb and len(ra) >= 2 and len(rb) >= 2 else None


def beats(a: tuple[VariantResult, int], b: tuple[VariantResult, int]) -> bool:
    """``a`` has more throughput than ``b`` beyond the noise: the paired ratio's interval above 1, or, without shared
    rounds, a's slow end above b's fast end."""
    r = ratio(a, b)
    if r is not None:
        return r.lo > MIN_GAIN
    return a[0].profile[a[1]].throughput_interval[0] > b[0].profile[b[1]].throughput_interval[1]


def _tput(o: tuple[VariantResult, int]) -> float:
    return o[0].profile[o[1]].throughput


def select(results: Sequence[VariantResult], target_batch_size: int,
           latency_slo_ms: float | None = None) -> Decision | None:
    """The decision, or None when no variant is faithful (and, with an SLO, fast enough)."""
    options = _options(results, target_batch_size, latency_slo_ms)
    if not options:
        return None
    fastest = max(options, key=_tput)
    tied = [o for o in options if not beats(fastest, o)]
    chosen = min(tied, key=lambda o: (simplicity(o[0]), -_tput(o)))
    runner = max((o for o in options if o[0].name != chosen[0].name), key=_tput, default=None)
    s = chosen[0].profile[chosen[1]]
    rs = runner[0].profile[runner[1]] if runner else None
    p = ratio(chosen, runner) if runner else None
    return Decision(paired=(p.median, p.lo, p.hi) if p else None, paired_rounds=p.rounds if p else None,chosen=chosen[0].name, batch=chosen[1], throughput=s.throughput, interval=s.throughput_interval,
                    fastest=fastest[0].name, tied=tuple(o[0].name for o in tied if o[0].name != chosen[0].name),
                    runner_up=runner[0].name if runner else None, runner_up_throughput=rs.throughput if rs else None,
                    runner_up_interval=rs.throughput_interval if rs else None,
                    margin=p.median if p else s.throughput / rs.throughput if rs else None, beyond_noise=bool(runner) and beats(chosen, runner),
                    why=explain(chosen, fastest, runner, tied, latency_slo_ms))


def _figure(o: tuple[VariantResult, int]) -> str:
    s = o[0].profile[o[1]]
    lo, hi = s.throughput_interval
    return f"{s.throughput:,.0f} items/s [{lo:,.0f}-{hi:,.0f}]"


def explain(chosen, fastest, runner, tied, slo) -> str:
    """The decision in words, for the report and the terminal."""
    where = f"at batch size {chosen[1]}" + (f" with p99 under {slo:g} ms" if slo is not None else "")
    name = chosen[0].name
    if runner is None:
        return f"{name} is the only faithful variant {where}: {_figure(chosen)}"
    r = ratio(chosen, runner)
    by_rounds = (f"; round by round {r.median:.3f}x [{r.lo:.3f}-{r.hi:.3f}] over {r.rounds} shared rounds"
                 if r is not None else "")
    if name == fastest[0].name and beats(chosen, runner):
        times = _tput(chosen) / _tput(runner)
        # where they shared rounds, the headline is the ratio those rounds give: the figures' medians also count the
        # rounds one had alone (after the other was dropped), which can run faster or slower than the shared ones
        apart = ("" if r is None or abs(math.log(times / r.median)) <= math.log(APART) else f"; their own figures, "
                 f"each over every round it had, differ {times:.2f}x: rounds timed apart, the shared ones decide")
        return (f"{name} is the fastest {where}: {_figure(chosen)}, {r.median if r else times:.2f}x "
                f"the runner-up {runner[0].name} ({_figure(runner)}), beyond the noise{by_rounds}{apart}")
    others = [o[0].name for o in tied if o[0].name != name]
    if others:
        head = f"{name} ({_figure(chosen)}) ties {where} with {', '.join(others)} within the noise"
    else:
        head = f"{name} ({_figure(chosen)}) leads {where}, but not beyond the noise of {runner[0].name} ({_figure(runner)})"
    if name != fastest[0].name:
        head += f" (the highest median: {fastest[0].name}, {_figure(fastest)})"
    other = fastest[0] if name != fastest[0].name else runner[0]
    gap = ratio(fastest, chosen) if name != fastest[0].name else r  # the fastest's lead, round by round
    small = (f" (its interval above 1, but a gain under {MIN_GAIN - 1:.0%} is a tie: two runs of one search differ "
             "by more)" if gap is not None and 1.0 < gap.lo <= MIN_GAIN else "")
    return head + by_rounds + small + f"; the tie goes to the simpler: {name} {_simpler(chosen[0], other)}"


def _simpler(a: VariantResult, b: VariantResult) -> str:
    if a.compressed != b.compressed:
        return f"is uncompressed (exact fp32), {b.name} is not"
    if a.runtime != b.runtime:
        return f"runs from {WHAT.get(a.runtime, a.runtime)}, {b.name} from {WHAT.get(b.runtime, b.runtime)}"
    if round(a.cold_start_s or 0, 1) != round(b.cold_start_s or 0, 1):
        return f"loads in {a.cold_start_s:.2f} s, {b.name} in {b.cold_start_s:.2f} s"
    if (a.artifact_bytes or 0) != (b.artifact_bytes or 0):
        return f"is {(a.artifact_bytes or 0) / 2**20:.2f} MB, {b.name} {(b.artifact_bytes or 0) / 2**20:.2f} MB"
    return f"is listed first of the two ({b.name})"


def closest(results: Sequence[VariantResult]) -> VariantResult | None:
    """The rejected variant nearest to the budget (highest accuracy where labels gave one, else highest cosine), to
    name when nothing passes."""
    rejected = [r for r in results if r.status == "rejected" and r.selectable and r.fidelity]
    return max(rejected, key=lambda r: (r.fidelity.accuracy or 0.0, r.fidelity.cosine), default=None)
