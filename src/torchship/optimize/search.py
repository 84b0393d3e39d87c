"""The search: build each variant in its worker, check it against the reference, give it a first timing (the probe);
then time the contenders in interleaved rounds, dropping after each round those the leader beats beyond the noise
(successive halving), until the leader stands clear, the rounds run out or the time budget is spent.

A variant whose parent runs so far behind the leader that its transform cannot plausibly close the gap (int8 gains
at most about 4x over its runtime on a CPU with VNNI, bf16 2x) is not built at all: a row that says why.
"""
from __future__ import annotations

import random
import select
import time
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import numpy as np

from ..measure import MIN_GAIN, CpuWatch, Noise, estimate, paired
from ..plan import VariantPlan
from ..profile import stats
from ..results import VariantResult
from ..runtimes.base import quantizer
from ..transforms import GAINS, most_gain
from ..verify import compare
from .protocol import Built, TimeBatch
from .workers import WorkerLost

MIN_ROUNDS = 3  # interleaved rounds every contender gets (after its probe), before any is dropped
MAX_ROUNDS = 8  # survivors within the noise of each other go on to this many, for tighter intervals
TIE_ROUNDS = 16  # and the leader still tied round by round with another keeps being timed up to this many
PAUSE_S = 0.005  # before each block: other workers' spinning threads (ONNX Runtime, OpenMP) go idle


def transform_kind(vp: VariantPlan) -> str | None:
    """The family whose gain bounds a compressed variant (``transforms.GAINS``): its transforms' (a registered config's
    ``family``), int8 for a runtime's own quantization, else its precision; None for a plain runtime or a trained one."""
    if vp.derived:
        return None
    from ..transforms import family
    found = [family(t) for t in vp.transforms] + (["int8"] if vp.options.quantize else [])
    if found:  # the most generous bound of them
        return max(found, key=lambda f: GAINS[f][2] if f in GAINS else float("inf"))
    return vp.options.precision if vp.options.precision != "fp32" else None


def max_gain(kind: str, flags: frozenset, share: float = 1.0) -> float:
    """The most a transform of family ``kind`` plausibly speeds its runtime up on this CPU (generous: a bound, not an
    estimate), where it changes layers that take ``share`` of the time; no bound (infinite) for a family without one."""
    return most_gain(kind, flags, share) if kind in GAINS else float("inf")


@dataclass
class SearchRow:
    plan: VariantPlan
    result: VariantResult
    worker: object | None = None  # kept while the variant is a contender
    samples: dict[int, list[list[float]]] = field(default_factory=dict)  # interleaved rounds
    probe: dict[int, list[float]] = field(default_factory=dict)  # the first timing, right after the build
    by_size: dict[int, dict[int, list[list[float]]]] = field(default_factory=dict)  # a mix's sizes: batch -> size -> calls
    errors: dict[int, str] = field(default_factory=dict)

    def rounds(self, bs: int) -> list[list[float]]:
        """What a figure is made of: the interleaved rounds once there are two, else the probe with them (the probe
        was timed apart from the others, on a variant just built)."""
        rounds = self.samples.get(bs, [])
        return rounds if len(rounds) >= 2 else [self.probe[bs], *rounds] if bs in self.probe else rounds

    def timed(self, bs: int) -> bool:
        return bs in self.probe or bs in self.samples


class Search:
    def __init__(self, ws, say: Callable[[str, int, int], None], planned: int, clock=time.monotonic,
                 flags: frozenset | None = None):
        self.ws, self.opts, self.say, self.clock, self.planned = ws, ws.opts, say, clock, planned
        self.flags = flags  # the CPU's flags the gains are bounded by (None: this machine's; tests inject them)
        from ..machine import cores
        self.slots = max(1, min(4, cores()))  # builds at once
        self.started = clock()
        self.entries: list[SearchRow] = []
        self.deciding = tuple(self.opts.batch_sizes) if self.opts.latency_slo_ms is not None else (self.opts.target,)
        self.block_s = self.opts.seconds_per_size / 5
        self.noise: Noise | None = None

    # --- the time budget -------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> str:
        budget = self.opts.time_budget_s
        return "" if budget is None else f" ({max(0.0, budget - self.elapsed()):.0f} s of the time budget left)"

    def over_budget(self, share: float = 1.0) -> bool:
        budget = self.opts.time_budget_s
        return budget is not None and self.elapsed() > share * budget

    def spent(self, coming: bool) -> str | None:
        """Why a variant not started yet is not tried: past 0.75 of the time budget, once one candidate is built or
        (``coming``) on its way, so that a bundle is made; else None."""
        if self.over_budget(0.75) and (coming or any(e.result.ok and e.result.selectable for e in self.entries)):
            return (f"not tried: the time budget of {self.opts.time_budget_s:g} s was spent on the variants before it "
                    "(raise --time-budget)")
        return None

    # --- phase 1: build, verify, probe ----------------------------------------------------------------------------
    def add(self, result: VariantResult, plan: VariantPlan) -> VariantResult:
        self.entries.append(SearchRow(plan, result))
        return result

    def skip(self, vp: VariantPlan, reason: str, training=None) -> None:
        """``vp`` is a row that is not built, for ``reason``."""
        self.add(VariantResult(status="skipped", reason=reason, **self._base(vp, training)), vp)

    def not_worth_building(self, vp: VariantPlan) -> str | None:
        """Why a compressed child of a slow parent cannot win here, or None."""
        kind = transform_kind(vp)
        if kind is None or self.opts.exhaustive:
            return None
        name = self.ws.lineage(vp).parent
        parent = next((e for e in self.entries if e.plan.name == name and e.timed(self.opts.target)), None)
        leader = self.leader()
        if parent is None or leader is None or leader is parent:
            return None
        from ..machine import cpu
        from ..transforms import covers
        own = quantizer(vp.runtime, vp.options.quantize)
        linear = any(covers(t) == "linear" for t in vp.transforms) or own is not None and own.covers == "linear"
        share = self.ws.linear_share() if linear else 1.0
        gain = max_gain(kind, cpu()[1] if self.flags is None else self.flags, share)
        target = self.opts.target
        p_fast = self.estimate(parent, target).lo  # the parent at its fastest ...
        l_slow = self.estimate(leader, target).hi  # ... the leader at its slowest
        if p_fast / gain <= l_slow:
            return None
        where = (f" on the Linear layers it quantizes, {share:.0%} of eager's time on this model" if linear
                 else " over its runtime")
        return (f"not tried: {parent.plan.name} runs at {l_slow / p_fast:.2f}x the speed of {leader.plan.name} at batch size "
                f"{target}, and {kind} gains at most {gain:.2g}x{where} on this CPU (--exhaustive tries it anyway)")

    def build_all(self, items: list[tuple[VariantPlan, object, dict | None]]) -> None:
        """Build a stage of variants that depend on none of each other, ``slots`` at a time (a build mostly keeps one
        core busy: inductor's code generation, then one compiler), compare each with the reference, then probe each
        on a quiet machine: every batch size timed once, before anything else is built."""
        queue, running, done = sorted(items, key=lambda item: self.expected(item[0])), [], []
        while queue or running:
            while queue and len(running) < self.slots:
                vp, program, training = queue.pop(0)
                why = self.spent(any(r[0].selectable for r in running))
                if why:  # a stage is planned at its start: the budget may run out while it builds
                    self.skip(vp, why, training)
                    continue
                started = self._start(vp, program, training)
                if started is not None:
                    running.append(started)
                    if not hasattr(started[1], "conn"):  # in this process: it builds when asked, alone
                        done.append(self._finish(*started))
                        running.pop()
            if not running:
                continue
            self.say(f"building {', '.join(r[0].name for r in running)}{self.left()}", len(self.entries), self.planned)
            timeout = min(max(0.05, r[3] + self.opts.timeout_s - time.perf_counter()) for r in running)
            ready, _, _ = select.select([r[1].conn for r in running], [], [], timeout)
            for r in list(running):
                if r[1].conn in ready or time.perf_counter() - r[3] >= self.opts.timeout_s:
                    running.remove(r)
                    done.append(self._finish(*r))
        for entry in done:
            if entry is not None and entry.worker is not None:
                self.say(f"first timing of {entry.plan.name}{self.left()}", len(self.entries), self.planned)
                self.time(entry, self.opts.batch_sizes, probe=True)
                if not entry.result.ok or self.hopeless(entry):
                    self.release(entry)
                entry.result = msgspec.structs.replace(entry.result, wall_s=(entry.result.wall_s or 0)
                                                       + sum(map(sum, entry.probe.values())))

    def expected(self, vp: VariantPlan) -> tuple[bool, float]:
        """The order a stage starts its builds in, the longest expected first, so that no long build starts last
        with the other core idle (on MiniLM, aoti-bf16 last in the plan's order built alone for 17 s): int8 with
        accuracy control first (a search of quantizations: 55-69 s), then by how long the variant's plain
        runtime's worker took in this search (inductor's 2-4x ONNX Runtime's and OpenVINO's; not its build time:
        torch.compile compiles on the first call, after it); the plan's order among equals."""
        own = quantizer(vp.runtime, vp.options.quantize)
        parent = next((e.result for e in self.entries if e.plan.name == self.ws.lineage(vp).parent), None)
        return not (own is not None and own.keeps_floors), -((parent and (parent.wall_s or parent.build_s)) or 0.0)

    def _base(self, vp: VariantPlan, training) -> dict:
        """What every row of ``vp`` says, whatever becomes of it."""
        return dict(name=vp.name, runtime=vp.runtime, note=vp.note, selectable=vp.selectable, options=vp.options,
                    transforms=vp.transforms, lineage=self.ws.lineage(vp), training=training)

    def _start(self, vp: VariantPlan, program, training):
        base = self._base(vp, training)
        t0 = time.perf_counter()
        try:
            return vp, self.ws.start(vp, program), base, t0
        except WorkerLost as exc:
            self.add(VariantResult(status="failed", reason=str(exc), **base), vp)
            return None

    def _finish(self, vp: VariantPlan, worker, base: dict, t0: float) -> SearchRow | None:
        """The built variant compared with the reference; its worker kept for timing when it built."""
        ws = self.ws
        wall = lambda: time.perf_counter() - t0  # noqa: E731
        try:
            built: Built = worker.built(max(0.05, t0 + self.opts.timeout_s - time.perf_counter()))
        except WorkerLost as exc:
            self.add(VariantResult(status="failed", reason=str(exc), wall_s=wall(), **base), vp)
            return None
        if built.status != "ok":
            worker.close()
            self.add(VariantResult(status=built.status, reason=built.reason, wall_s=wall(), **base), vp)
            return None
        with np.load(built.outputs, allow_pickle=False) as z:
            outputs = {k: z[k] for k in z.files}
        fidelity = compare(ws.reference, outputs, self.opts.budget, ws.model.task, ws.pool.labels)
        fidelity = self._beyond_the_example(fidelity, built, vp, outputs)
        fidelity = self._calibration_unlike(fidelity, vp)
        result = VariantResult(status="ok" if fidelity.passed else "rejected", reason="" if fidelity.passed else fidelity.reason,
                               artifact=built.artifact, fidelity=fidelity, build_s=built.build_s,
                               cold_start_s=built.cold_start_s, artifact_bytes=built.artifact_bytes,
                               peak_memory_mb=built.peak_memory_mb, peak_memory_kind=built.peak_memory_kind,
                               sparsity=built.sparsity, cached=built.cached, wall_s=wall(), **base)
        entry = SearchRow(vp, self._raw_input(result, built), worker)
        self.entries.append(entry)
        return entry

    def _calibration_unlike(self, fidelity, vp: VariantPlan):
        """A variant that held the budget's floors as it was built (on the calibration data) and misses one of them
        on the held-out data: the two differ, and the reason says what to give. (MiniLM, int8-mixed under
        retrieval=0.95: 0.972 on the zoo's 64 sentences, 0.924 on 256 standard-library docstrings, the same on
        docstrings in sets of 64: the data, not its size.)"""
        missed = [part.strip() for part in fidelity.reason.split(";")]
        if fidelity.passed or not any(m.startswith(f"{k} ") for m in missed for k in vp.options.floors):
            return fidelity
        data = self.ws.model.calibration_data or self.ws.pool.inputs
        n = len(next(iter(data.values())))
        return msgspec.structs.replace(fidelity, reason=(
            f"{fidelity.reason}; its build kept the floors on the {n} calibration inputs, so the held-out inputs are "
            "unlike them: calibrate on inputs like these (--calibration-data)"))

    def _beyond_the_example(self, fidelity, built: Built, vp: VariantPlan, pooled: dict[str, np.ndarray]):
        """The verdict on the other inputs, folded into the fidelity: a variant that diverges there is rejected with
        the reason, whatever runtime made it (reference rows are only reported)."""
        from ..optimize.job import cases
        from ..verify import beyond_the_example, relative_error
        if not self.ws.extra or not built.extra_outputs:
            return fidelity
        with np.load(built.extra_outputs, allow_pickle=False) as z:
            got = cases({k: z[k] for k in z.files})
        outputs = [None if i in built.extra_errors else got.get(i, {}) for i in range(len(self.ws.extra))]
        kind = (vp.derived or ("",))[0]
        own = quantizer(vp.runtime, vp.options.quantize)
        unjudged = ("calibrated ranges" if own is not None and own.calibrated or kind == "qat" else "trained within the data's range" if kind else None)
        reference = self.ws.reference  # the batch cases' items, in the verification run (where its outputs fit)
        fits = all(k in pooled and pooled[k].shape == v.shape for k, v in reference.items())
        same_items = {i: relative_error({k: v[idx] for k, v in reference.items()}, {k: pooled[k][idx] for k in reference})
                      for i, idx in self.ws.extra_items.items()} if fits else {}
        checked, worst, reason = beyond_the_example(fidelity.relative_error or 0.0, self.ws.extra, outputs,
                                                    built.extra_errors, unjudged, same_items)
        diverged = reason is not None and vp.selectable
        return msgspec.structs.replace(fidelity, checked=checked, extra_error=worst,
                                       passed=fidelity.passed and not diverged,
                                       reason=(reason if fidelity.passed else f"{fidelity.reason}; {reason}") if diverged
                                       else fidelity.reason)

    def _raw_input(self, result: VariantResult, built: Built) -> VariantResult:
        """The verdict on raw input through the bundle's pipeline (``ws.raw``: where the pipeline is right), folded
        in: a candidate whose answer on any item there falls short of its floor (``optimize.raw.floor``) is rejected
        with the reason before the timing rounds (it gets its probe, as any rejected row), as the check of the chosen
        variant after the search would reject it."""
        from .raw import floor, shortfall
        raw = getattr(self.ws, "raw", None)
        if raw is None or result.fidelity is None or not result.selectable:
            return result
        budget = self.opts.budget.in_force(self.ws.pool.labels is not None, self.ws.model.task == "embed")
        limit = floor(budget, result)
        if built.raw_outputs is None:
            worst, why = None, f"it raised on it ({built.raw_error})"
        else:
            with np.load(built.raw_outputs, allow_pickle=False) as z:
                check = raw.check({k: z[k] for k in z.files}, limit)
            worst, why = check.min_cosine, shortfall(check)
        fidelity = msgspec.structs.replace(result.fidelity, raw_cosine=worst, raw_floor=limit)
        if why is None or not result.fidelity.passed:
            return msgspec.structs.replace(result, fidelity=fidelity)
        reason = f"raw input: {why}"
        return msgspec.structs.replace(result, status="rejected", reason=reason,
                                       fidelity=msgspec.structs.replace(fidelity, passed=False, reason=reason))

    def time(self, entry: SearchRow, sizes, probe: bool = False) -> None:
        """One block per batch size (the probe: warmed up longer, and kept apart from the rounds)."""
        for bs in sizes:
            if bs in entry.errors or entry.worker is None:
                continue
            known = entry.rounds(bs)
            long_calls = bool(known) and float(np.median(np.concatenate(known))) > self.block_s / 4
            # warm-up: one call and a while for the probe; none in the rounds for calls long enough to warm themselves
            request = TimeBatch(bs, runs=2, seconds=self.block_s, max_runs=2000, warmup=1 if probe or not long_calls else 0,
                                warmup_s=self.block_s / 2 if probe else 0.0 if long_calls else self.block_s / 10,
                                pause_s=PAUSE_S, mix=self.ws.mix)
            try:
                s = entry.worker.time(request, self.opts.timeout_s)
            except WorkerLost as exc:
                entry.result = msgspec.structs.replace(entry.result, status="failed", reason=f"while timing: {exc}")
                entry.worker = None
                return
            for size, seconds in s.by_size.items():
                entry.by_size.setdefault(bs, {}).setdefault(size, []).append(list(seconds))
            if s.error:
                entry.errors[bs] = s.error
            elif probe:
                entry.probe[bs] = list(s.seconds)
            else:
                entry.samples.setdefault(bs, []).append(list(s.seconds))

    def release(self, entry: SearchRow) -> None:
        if entry.worker is not None:
            entry.worker.close()
            entry.worker = None

    # --- phase 2: interleaved rounds --------------------------------------------------------------------------------
    def estimate(self, entry: SearchRow, bs: int):
        return estimate(entry.rounds(bs))

    def timing(self) -> list[SearchRow]:
        """Timed in the rounds: the faithful candidates, and the reference rows (so that their figures come from the
        same rounds as the variants they are compared with)."""
        return [e for e in self.entries if e.worker is not None and e.result.ok
                and all(e.timed(bs) for bs in self.deciding)]

    def contenders(self) -> list[SearchRow]:
        return [e for e in self.timing() if e.result.selectable]

    def leader(self) -> SearchRow | None:
        timed = [e for e in self.entries if e.result.ok and e.result.selectable and e.timed(self.opts.target)]
        return min(timed, key=lambda e: self.estimate(e, self.opts.target).median, default=None)

    def hopeless(self, entry: SearchRow) -> bool:
        """Far behind the leader after its probe: even its fastest single calls are slower than half the leader's."""
        leader = self.leader()
        if leader is None or leader is entry or not entry.result.selectable or not entry.timed(self.opts.target):
            return False
        fast = float(np.percentile(np.concatenate(entry.rounds(self.opts.target)), 10))
        return fast > 2 * self.estimate(leader, self.opts.target).hi

    def beaten(self, entry: SearchRow, leader: SearchRow) -> bool:
        """Beaten beyond the noise at every deciding batch size: the paired ratio of their rounds above ``MIN_GAIN``
        (or, before two shared rounds, the leader's slow end faster than its fast end)."""
        return all(self._ahead(leader, entry, bs, MIN_GAIN) for bs in self.deciding
                   if entry.timed(bs) and leader.timed(bs))

    def _ahead(self, a: SearchRow, b: SearchRow, bs: int, gain: float = 1.0) -> bool:
        """``a`` faster than ``b`` at ``bs``: the interval of their paired ratio above ``gain``."""
        r = paired(a.samples.get(bs, []), b.samples.get(bs, []))
        if r is not None:
            return r.lo > gain
        return self.estimate(a, bs).hi < self.estimate(b, bs).lo

    def undecided(self) -> bool:
        """The leader ties round by round with another contender at the target batch size."""
        leader, target = self.leader(), self.opts.target
        return leader is not None and any(not self._ahead(leader, e, target) for e in self.contenders()
                                          if e is not leader and e.timed(target))

    def rounds(self, pids: Callable[[], list[int]]) -> None:
        """Time the contenders round after round, in a new order each round; drop the beaten ones."""
        watch = CpuWatch(pids)  # lapped at the end of each round, before anyone is dropped
        rng = random.Random(0)
        for r in range(1, TIE_ROUNDS + 1):
            alive = self.timing()
            # a variant timed alone is compared with nothing: every figure that decides comes from shared rounds
            if not alive or self.over_budget() or r > MIN_ROUNDS and len(self.contenders()) < 2:
                break
            if r > MAX_ROUNDS and not self.undecided():  # past the usual rounds only while a tie is still open
                break
            most = MAX_ROUNDS if r <= MAX_ROUNDS else TIE_ROUNDS
            self.say(f"timing round {r} of at most {most}: {len(alive)} variant(s){self.left()}", r, most)
            rng.shuffle(alive)
            for entry in alive:  # the first two rounds time every batch size, the others the deciding ones
                self.time(entry, self.opts.batch_sizes if r <= 2 else self.deciding)
            watch.lap()
            if r >= MIN_ROUNDS:  # successive halving: the reference rows and the beaten go
                leader = self.leader()
                for entry in self.timing():
                    if not entry.result.selectable or entry is not leader and self.beaten(entry, leader):
                        self.release(entry)
        spreads = [self.estimate(e, self.opts.target).spread for e in self.entries
                   if e.result.ok and len(e.samples.get(self.opts.target, ())) > 1]
        self.noise = watch.noise(float(np.median(spreads)) if spreads else 0.0)

    def results(self) -> list[VariantResult]:
        out = []
        for e in self.entries:
            sizes = sorted(set(e.samples) | set(e.probe))
            if sizes or e.errors:
                target = self.opts.target
                e.result = msgspec.structs.replace(
                    e.result, profile={bs: stats(bs, e.rounds(bs)) for bs in sizes}, profile_errors=dict(e.errors),
                    samples={bs: tuple(tuple(r) for r in e.rounds(bs)) for bs in sizes},
                    by_length={n: stats(target, r) for n, r in e.by_size.get(target, {}).items()})
            out.append(e.result)
        return out

    def close(self) -> None:
        for e in self.entries:
            self.release(e)

    def worker_pids(self) -> list[int]:
        return [e.worker.pid for e in self.entries if e.worker is not None and hasattr(e.worker, "pid")]
