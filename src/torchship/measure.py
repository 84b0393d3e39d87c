"""Timing that holds on a shared machine: interleaved rounds, every sample kept, a median with its interval, and a
verdict that calls a difference inside the noise a tie.

A *round* times every candidate once, one after another, so that a burst of load from elsewhere hits them alike;
each round gives one median per candidate. The interval of a figure is a distribution-free confidence interval of
the median over its rounds (order statistics of the round medians). One candidate is faster than another only when
their intervals do not overlap; otherwise they tie. Decisions take recorded samples, so tests inject them.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import msgspec
import numpy as np

CONFIDENCE = 0.9
# one variant beats another round by round only when the interval of its paired ratio lies above this: a smaller gain
# is a tie whatever the rounds say. Within one run the pairing cancels what rounds share, and the interval can be
# that narrow (a test model that sleeps: eager-bf16 over eager at 1.005x [1.002-1.006], which chose bf16's numbers for
# nothing); between runs the same pair moves by more (openvino-bf16 over aoti-bf16: 1.048x, 1.058x, 1.069x and 1.073x
# in four searches of MiniLM on one machine)
MIN_GAIN = 1.02


class Estimate(msgspec.Struct, frozen=True):
    """Seconds per call: the median of every sample, and the interval of the median over the rounds."""

    median: float
    lo: float
    hi: float
    rounds: int
    samples: int

    @property
    def spread(self) -> float:
        """Half the interval's width as a fraction of the median (0.05: +-5%)."""
        return (self.hi - self.lo) / (2 * self.median) if self.median > 0 else 0.0

    def rate(self, items: int = 1) -> tuple[float, float, float]:
        """(items per second at the median, at the interval's slow end, at its fast end)."""
        return items / self.median, items / self.hi, items / self.lo


def order_statistics(n: int, confidence: float = CONFIDENCE) -> tuple[int, int]:
    """0-based ranks (k, n-1-k) of the sorted round medians that bound the median with at least ``confidence``
    (binomial, distribution-free); the widest pair (0, n-1) when n is too small to reach it."""
    best = 0
    for k in range(n // 2):
        below = sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # P(at most k of n rounds fall below the median)
        if 1 - 2 * below >= confidence:
            best = k + 1
        else:
            break
    k = max(0, best - 1) if best else 0
    return k, n - 1 - k


def estimate(rounds: Sequence[Sequence[float]]) -> Estimate:
    """The estimate from per-round samples (seconds per call); rounds without samples are left out."""
    rounds = [r for r in rounds if len(r)]
    if not rounds:
        raise ValueError("no samples")
    medians = sorted(float(np.median(r)) for r in rounds)
    everything = np.concatenate([np.asarray(r, dtype=float) for r in rounds])
    median = float(np.median(everything))
    if len(medians) == 1:  # one round: the spread of single calls within it is all there is to show
        lo, hi = (float(np.percentile(everything, q)) for q in (25, 75))
    else:
        k, j = order_statistics(len(medians))
        lo, hi = medians[k], medians[j]
    return Estimate(median, min(lo, median), max(hi, median), len(rounds), len(everything))


def paired(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> Estimate | None:
    """``b``'s time over ``a``'s, round by round, from interleaved rounds (round i of each was timed in the same
    pass, so what a round shares, a burst of load from elsewhere, cancels in the ratio): the median ratio and its
    interval over the rounds both had. None with fewer than two such rounds."""
    k = min(len(a), len(b))
    ratios = [[float(np.median(rb)) / float(np.median(ra))] for ra, rb in zip(a[:k], b[:k]) if len(ra) and len(rb)]
    return estimate(ratios) if len(ratios) >= 2 else None


def faster(a: Estimate, b: Estimate) -> bool:
    """``a`` takes less time than ``b`` beyond the noise: the two intervals do not overlap."""
    return a.hi < b.lo


def verdict(a: Estimate, b: Estimate) -> str:
    """"faster", "slower" or "tie" for ``a`` against ``b``."""
    return "faster" if faster(a, b) else "slower" if faster(b, a) else "tie"


def interleave(fns: Mapping[str, Callable[[], object]], *, rounds: int = 5, block_s: float = 0.05, min_runs: int = 2,
               max_runs: int = 200, warmup: int = 1, clock=time.perf_counter) -> dict[str, list[list[float]]]:
    """Time each function in rounds: every round runs each one for about ``block_s`` (at least ``min_runs`` calls),
    in turn. Returns the seconds of every call, per function, per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times, stop = [], clock() + block_s
            while len(times) < min_runs or (len(times) < max_runs and clock() < stop):
                t0 = clock()
                fn()
                times.append(clock() - t0)
            out[name].append(times)
    return out


class Noise(msgspec.Struct, frozen=True):
    """How quiet the machine was while candidates were timed, and what that means for the figures."""

    other_cores: float  # cores' worth of CPU that processes other than this run's used
    steal: float  # fraction of CPU time the hypervisor took
    spread: float  # typical half-width of a figure's interval, as a fraction (0.05: +-5%)
    seconds: float

    NOISY_CORES = 0.3
    NOISY_STEAL = 0.05
    NOISY_SPREAD = 0.10

    @property
    def noisy(self) -> bool:
        return self.other_cores > self.NOISY_CORES or self.steal > self.NOISY_STEAL or self.spread > self.NOISY_SPREAD

    @property
    def busy(self) -> bool:
        """Others took the CPU: other processes, or the hypervisor (steal)."""
        return self.other_cores > self.NOISY_CORES or self.steal > self.NOISY_STEAL

    def describe(self, cores: int) -> str:
        """What was measured, in words that match it: busy only when others took the CPU; a wide spread on a quiet
        machine is the figures' own variation, said as such."""
        what = (f"other processes used {self.other_cores:.1f} of {cores} cores, CPU steal {self.steal:.0%}; "
                f"figures spread +-{self.spread:.0%} between rounds")
        ties = ("variants whose intervals overlap are declared ties; time again (with more --seconds-per-size, or on a "
                "quiet machine) for a sharper choice")
        if self.busy:
            return (f"the machine was busy while timing ({what}): absolute figures may be off by that much or more, "
                    f"and {ties}")
        if self.spread > self.NOISY_SPREAD:
            return (f"the machine was quiet while timing, but the figures spread widely between rounds ({what}): "
                    f"the variation is the runs' own (frequency scaling, caches, allocation), and {ties}")
        return f"the machine was quiet while timing ({what})"


class CpuWatch:
    """CPU use of the machine's cores (those this process may run on) and of this run's own processes, from /proc,
    over laps: each lap counts only the processes alive at both of its ends, so a worker that exits in between
    never makes its CPU look like someone else's."""

    def __init__(self, pids: Callable[[], Sequence[int]], clock=time.monotonic):
        self.pids, self.clock = pids, clock
        self.seconds = self.busy = self.steal = self.total = self.own = 0.0
        self._start = self._read()

    @staticmethod
    def _cpu_lines() -> list[list[int]]:
        import os
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
        return [[int(x) for x in fields[1:9]] for fields in lines if mine is None or fields[0] in mine]

    def _read(self):
        own = {}
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                own[pid] = int(stat[11]) + int(stat[12])  # utime + stime, in clock ticks
            except (OSError, IndexError, ValueError):
                continue
        try:
            cpus = self._cpu_lines()
        except (OSError, ValueError):
            cpus = []
        total = sum(sum(c) for c in cpus)
        idle = sum(c[3] + c[4] for c in cpus)
        steal = sum(c[7] for c in cpus)
        return self.clock(), total, total - idle - steal, steal, own

    def lap(self) -> None:
        """Count the time since the last lap (or the start)."""
        end = self._read()
        (t0, total0, busy0, steal0, own0), (t1, total1, busy1, steal1, own1) = self._start, end
        self.seconds += t1 - t0
        self.total += total1 - total0
        self.busy += busy1 - busy0
        self.steal += steal1 - steal0
        self.own += sum(own1[p] - own0[p] for p in own0 if p in own1)
        self._start = end

    def noise(self, spread: float) -> Noise:
        import os
        self.lap()
        hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        seconds = max(self.seconds, 1e-9)
        return Noise(other_cores=max(0.0, self.busy - self.own) / hz / seconds,
                     steal=self.steal / max(self.total, 1.0), spread=spread, seconds=self.seconds)
