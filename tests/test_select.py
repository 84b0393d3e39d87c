"""Choices on recorded measurements: the fastest beyond the noise, ties to the simpler variant, and the rounds that
drop the beaten. No wall clock decides anything here."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from torchship.measure import Estimate, Noise, estimate, order_statistics, verdict
from torchship.profile import Stats, stats
from torchship.results import VariantResult
from torchship.runtimes.base import BuildOptions
from torchship.select import closest, select
from torchship.verify import Fidelity


def rounds(ms: float, spread: float = 0.0, n: int = 5, calls: int = 20, seed: int = 0) -> list[list[float]]:
    """n rounds of per-call seconds around ``ms``; each round's median moves by up to +-spread."""
    rng = np.random.default_rng(seed)
    return [list(ms / 1e3 * (1 + spread * (2 * r / max(1, n - 1) - 1)) * (1 + 0.001 * rng.standard_normal(calls)))
            for r in range(n)]


def row(name, ms, spread=0.0, *, runtime="eager", status="ok", selectable=True, transforms=(), batch=8, p99=None,
        cold=0.01, size=1000, cos=1.0, extra=None):
    profile = {batch: stats(batch, rounds(ms, spread))}
    if p99 is not None:
        profile = {batch: Stats(**{**{f: getattr(profile[batch], f) for f in profile[batch].__struct_fields__}, "p99_ms": p99})}
    for bs, (m, p) in (extra or {}).items():
        s = stats(bs, rounds(m))
        profile[bs] = Stats(**{**{f: getattr(s, f) for f in s.__struct_fields__}, "p99_ms": p})
    return VariantResult(name=name, runtime=runtime, status=status, selectable=selectable, transforms=transforms,
                         fidelity=Fidelity(0.0, cos, cos, None, None, None, status == "ok", ""), profile=profile,
                         cold_start_s=cold, artifact_bytes=size)


def test_the_fastest_beyond_the_noise_wins_and_the_decision_says_so():
    rows = [row("fast-but-wrong", 0.5, status="rejected", cos=0.9), row("naive", 0.6, selectable=False),
            row("slow", 4.0), row("medium", 1.0, 0.02), row("runner", 2.0, 0.02), row("crashed", 9.0, status="failed")]
    d = select(rows, 8)
    assert d.chosen == "medium" and d.batch == 8 and d.fastest == "medium" and d.tied == ()
    assert d.runner_up == "runner" and d.margin == pytest.approx(2.0, rel=0.01) and d.beyond_noise
    assert "medium is the fastest at batch size 8" in d.why and "beyond the noise" in d.why and "runner" in d.why
    assert select([rows[0], rows[1]], 8) is None
    assert closest(rows).name == "fast-but-wrong"


def test_overlapping_intervals_tie_and_the_tie_goes_to_the_simpler_variant():
    """aoti-bf16's median is 3% higher, but the intervals overlap: a tie; the uncompressed onnxrt wins it, and the
    decision says why. Neither is reported faster than the other."""
    compressed = row("aoti-bf16", 0.97, 0.10, runtime="aoti", transforms=({"kind": "x"},))
    plain = row("onnxrt", 1.0, 0.10, runtime="onnxrt")
    d = select([compressed, plain, row("eager", 3.0)], 8)
    assert d.fastest == "aoti-bf16" and d.chosen == "onnxrt" and d.tied == ("aoti-bf16",)
    assert not d.beyond_noise and "ties at batch size 8 with aoti-bf16 within the noise" in d.why
    assert "onnxrt is uncompressed" in d.why
    # the same figures without the compression: the runtime with fewer moving parts wins
    d = select([row("aoti", 0.97, 0.10, runtime="aoti"), plain], 8)
    assert d.chosen == "onnxrt" and "single self-contained ONNX file" in d.why
    # far apart: no tie, the faster one wins whatever it is
    assert select([row("aoti", 0.5, 0.02, runtime="aoti"), plain], 8).chosen == "aoti"


def test_under_a_latency_slo_the_best_batch_size_that_keeps_p99():
    big = row("big", 8.0, p99=10.0, extra={1: (4.0, 2.5)})  # 1,000 items/s at 8; 250/s at batch 1
    small = row("small", 40.0, p99=2.0, extra={1: (4.0 / 0.8, 0.9)})  # 200/s at 8; 200/s at batch 1
    assert (select([big, small], 8, latency_slo_ms=20.0).chosen, select([big, small], 8, latency_slo_ms=20.0).batch) == ("big", 8)
    d = select([big, small], 8, latency_slo_ms=3.0)
    assert (d.chosen, d.batch) == ("big", 1) and "with p99 under 3 ms" in d.why
    d = select([big, small], 8, latency_slo_ms=1.0)
    assert (d.chosen, d.batch) == ("small", 1)
    assert select([big, small], 8, latency_slo_ms=0.1) is None


def test_intervals_come_from_the_rounds():
    assert order_statistics(5) == (0, 4) and order_statistics(10) == (1, 8) and order_statistics(20) == (5, 14)
    e = estimate([[1.0, 1.1], [1.2, 1.0], [0.9, 1.0], [1.1, 1.05], [1.0]])
    assert e.median == 1.0 and (e.lo, e.hi) == (0.95, 1.1) and e.rounds == 5 and e.samples == 9
    a, b = Estimate(1.0, 0.9, 1.1, 5, 50), Estimate(1.3, 1.2, 1.4, 5, 50)
    assert verdict(a, b) == "faster" and verdict(b, a) == "slower"
    assert verdict(a, Estimate(1.15, 1.05, 1.3, 5, 50)) == "tie"  # overlapping: never called faster
    s = stats(32, [[0.001] * 10, [0.002] * 10, [0.0015] * 10])
    lo, hi = s.throughput_interval
    assert lo == pytest.approx(16_000) and hi == pytest.approx(32_000) and s.rounds == 3


class ScriptedWorker:
    """A variant's worker that answers every timing request with calls of a fixed duration (seconds)."""

    def __init__(self, seconds: float, pid: int = 0, phase: int = 0):
        self.seconds, self.pid, self.requests, self.phase = seconds, pid, [], phase

    def time(self, request, timeout):
        from torchship.optimize.protocol import Samples
        self.requests.append(request.batch)
        jitter = 1 + 0.01 * (((len(self.requests) + self.phase) * 7919) % 5 - 2) / 2  # +-1% between rounds
        return Samples(request.batch, (self.seconds * jitter,) * 4)

    def close(self):
        pass


AVX512_VNNI = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})  # int8 and bf16 units, no AMX


def _search(entries, target=8, sizes=(1, 8), flags=AVX512_VNNI, phases=None):
    from torchship.optimize import OptimizeOptions
    from torchship.optimize.search import Search, SearchRow
    opts = OptimizeOptions(batch_sizes=sizes, target_batch_size=target)
    search = Search(SimpleNamespace(opts=opts, mix=None), lambda *a: None, len(entries), flags=flags)
    for i, (name, seconds, selectable) in enumerate(entries):
        result = VariantResult(name=name, runtime="eager", status="ok", selectable=selectable)
        e = SearchRow(SimpleNamespace(name=name), result, ScriptedWorker(seconds, phase=(phases or {}).get(name, 0)))
        search.time(e, sizes, probe=True)
        search.entries.append(e)
    return search


def test_rounds_drop_the_beaten_and_keep_timing_the_contenders():
    """Successive halving on scripted timings: the clearly slower variant and the reference row are released after
    the minimum rounds; two whose rounds go up and down out of step, 0.5% apart inside +-1% of noise, are timed on
    past the usual rounds while their paired ratio still straddles 1, and tie."""
    from torchship.optimize.search import MIN_ROUNDS, TIE_ROUNDS
    search = _search([("leader", 0.0010, True), ("close", 0.001005, True), ("slow", 0.0030, True), ("naive", 0.0025, False)],
                     phases={"close": 2})
    workers = {e.plan.name: e.worker for e in search.entries}
    search.rounds(lambda: [])
    by = {e.plan.name: e for e in search.entries}
    assert len(by["leader"].samples[8]) == len(by["close"].samples[8]) == TIE_ROUNDS
    assert len(by["slow"].samples[8]) == len(by["naive"].samples[8]) == MIN_ROUNDS
    assert by["slow"].worker is None and by["leader"].worker is not None
    assert workers["leader"].requests.count(1) == 3  # batch 1 in the probe and the first two rounds only
    d = select(search.results(), 8)
    assert {d.chosen, *d.tied} == {"leader", "close"} and not d.beyond_noise
    assert d.paired_rounds == TIE_ROUNDS and d.paired[1] <= 1.0 <= d.paired[2] and "over 16 shared rounds" in d.why


def test_a_difference_every_round_shares_is_settled_by_the_paired_ratio():
    """The issue-35 case: rounds move together under load (a burst slows both), so each variant's own interval is
    wide and the two overlap; the ratio round by round is steady at 1.10, beyond the noise: the faster one wins even
    though the other is simpler, and the search stops timing the slower one at the minimum rounds."""
    from torchship.optimize.search import MIN_ROUNDS
    load = [0.7, 1.5, 0.9, 1.3, 1.0, 1.2, 0.8, 1.4]

    def timed(name, runtime, seconds):
        rounds = tuple(tuple([seconds * f] * 4) for f in load)
        return VariantResult(name=name, runtime=runtime, status="ok", profile={8: stats(8, rounds)}, samples={8: rounds},
                             fidelity=Fidelity(0.0, 1.0, 1.0, None, None, None, True, ""))
    fast, simple = timed("compile", "compile", 0.010), timed("onnxrt", "onnxrt", 0.011)
    lo, hi = fast.profile[8].throughput_interval
    lo2, hi2 = simple.profile[8].throughput_interval
    assert lo < hi2 and lo2 < hi  # their own intervals overlap: the old rule called a tie and took onnxrt
    d = select([fast, simple], 8)
    assert d.chosen == "compile" and d.beyond_noise and d.paired == pytest.approx((1.1, 1.1, 1.1))
    assert "round by round 1.100x [1.100-1.100] over 8 shared rounds" in d.why
    search = _search([("a", 0.0010, True), ("b", 0.0011, True)])  # the same in the search's own rounds
    search.rounds(lambda: [])
    assert {e.plan.name: len(e.samples[8]) for e in search.entries} == {"a": MIN_ROUNDS, "b": MIN_ROUNDS}
    assert search.noise is not None and search.noise.spread < 0.05


def test_a_noisy_machine_is_named_with_what_it_means():
    quiet = Noise(other_cores=0.05, steal=0.0, spread=0.02, seconds=10)
    assert not quiet.noisy and quiet.describe(2).startswith("the machine was quiet")
    for busy in (Noise(1.0, 0.0, 0.02, 10), Noise(0.0, 0.2, 0.02, 10)):
        assert busy.noisy and busy.describe(2).startswith("the machine was busy") and "declared ties" in busy.describe(2)
    assert "other processes used 1.0 of 2 cores" in Noise(1.0, 0.0, 0.02, 10).describe(2)
    # quiet but spread (issue 34: an idle machine was called busy): said as what it is
    spread = Noise(0.0, 0.0, 0.12, 10)
    assert spread.noisy and not spread.busy
    words = spread.describe(2)
    assert words.startswith("the machine was quiet while timing, but the figures spread widely") and "busy" not in words
    assert "+-12%" in words and "declared ties" in words


def test_the_headline_ratio_is_the_shared_rounds_one_where_rounds_timed_apart_differ():
    """The demo's case: the runner-up was dropped after three rounds and the leader ran faster in the rounds it had
    without it (fewer processes alive). The medians differ 2x, the shared rounds 1.05x: the headline and the margin
    say 1.05x, and the words say the figures differ because of rounds timed apart."""
    def timed(name, runtime, rounds):
        rounds = tuple(tuple([t] * 4) for t in rounds)
        return VariantResult(name=name, runtime=runtime, status="ok", profile={8: stats(8, rounds)}, samples={8: rounds},
                             fidelity=Fidelity(0.0, 1.0, 1.0, None, None, None, True, ""))
    leader = timed("onnxrt", "onnxrt", [0.0100] * 3 + [0.0050] * 5)
    dropped = timed("torchscript", "torchscript", [0.0105] * 3)
    d = select([leader, dropped], 8)
    assert d.chosen == "onnxrt" and d.beyond_noise and d.margin == pytest.approx(1.05)
    assert "1.05x the runner-up torchscript" in d.why and "round by round 1.050x [1.050-1.050] over 3 shared" in d.why
    assert "differ 2.10x: rounds timed apart, the shared ones decide" in d.why
    close = timed("onnxrt", "onnxrt", [0.0100] * 3 + [0.0097] * 5)  # rounds apart 3% faster: not worth a word
    assert "differ" not in select([close, dropped], 8).why


def test_no_round_is_timed_alone_so_the_decision_agrees_with_the_search():
    """Once the leader has beaten everyone beyond the noise, timing stops: a figure timed alone would be compared
    with nothing, and could widen until the final decision called a tie with a variant the search had dropped."""
    from torchship.optimize.search import MIN_ROUNDS
    search = _search([("leader", 0.0010, True), ("beaten", 0.0030, True)])
    search.rounds(lambda: [])
    by = {e.plan.name: e for e in search.entries}
    assert len(by["leader"].samples[8]) == len(by["beaten"].samples[8]) == MIN_ROUNDS
    d = select(search.results(), 8)
    assert d.chosen == "leader" and d.beyond_noise and d.tied == ()


def test_a_compressed_child_of_a_runtime_far_behind_is_not_built_unless_exhaustive():
    from torchship.optimize import OptimizeOptions
    from torchship.plan import VariantPlan
    search = _search([("onnxrt", 0.0010, True), ("eager", 0.0100, True)])
    search.ws.lineage = lambda vp: SimpleNamespace(parent=vp.name.split("+")[0].removesuffix("-bf16"))
    search.ws.linear_share = lambda: 0.5
    int8 = VariantPlan("eager+int8", "eager", transforms=({"kind": "dynamic_int8", "at_load": True},))
    reason = search.not_worth_building(int8)
    # torch.ao int8 changes the Linear layers only: half the time here, so at most 1/(0.5 + 0.5/4) = 1.6x
    assert "eager runs at 0.10x the speed of onnxrt" in reason and "at most 1.6x on the Linear layers" in reason
    mixed = VariantPlan("eager+int8-mixed", "eager", BuildOptions(quantize="dynamic_int8_mixed"))  # a runtime's own
    assert "at most 1.6x on the Linear layers" in search.not_worth_building(mixed)  # int8 on Linear layers: the same
    close = VariantPlan("onnxrt+int8", "onnxrt", BuildOptions(quantize="dynamic_int8"))
    assert search.not_worth_building(close) is None  # the leader itself is its parent
    bf16 = VariantPlan("eager-bf16", "eager", BuildOptions(precision="bf16"))
    assert "bf16 gains at most 2x over its runtime" in search.not_worth_building(bf16)
    search.flags = AVX512_VNNI | {"amx_int8", "amx_bf16"}  # AMX: int8 layers up to 8x, so 1/(0.5 + 0.5/8) = 1.8x
    assert "at most 1.8x on the Linear layers" in search.not_worth_building(int8)
    search.opts = OptimizeOptions(batch_sizes=(1, 8), target_batch_size=8, exhaustive=True)
    assert search.not_worth_building(int8) is None


def test_compile_with_a_transform_that_failed_on_eager_is_not_tried():
    from torchship.plan import plan
    model = SimpleNamespace(module=torch.nn.Linear(2, 2), spec=SimpleNamespace(symbols=[]), arch=None)
    by = {v.name: v for v in plan(model, "cpu", None, None, ("int8",))}
    assert by["compile+ao-int8"].sibling == "eager+ao-int8" and by["compile+ao-int8wo"].sibling == "eager+ao-int8wo"
    # eager's weight-only int8 is there as compile's check: without compile, it is not planned
    alone = {v.name for v in plan(model, "cpu", ["eager"], None, ("int8",))}
    assert "eager+ao-int8" in alone and "eager+ao-int8wo" not in alone


class MixWorker(ScriptedWorker):
    """A worker whose batch costs a fixed time at each size of a mix: it answers as job.Variant.time does, one weighed
    call per timed call and each size's seconds beside it (nothing is measured)."""

    def __init__(self, cost: dict[int, float]):
        super().__init__(0.0)
        self.cost = cost

    def time(self, request, timeout):
        from torchship.optimize.protocol import Samples
        self.requests.append(request)
        mix = request.mix
        sizes = dict(zip(mix.sizes, mix.weights))
        return Samples(request.batch, (sum(w * self.cost[s] for s, w in sizes.items()),) * 4,
                       by_size={s: (self.cost[s],) * 4 for s in sizes})


def test_the_choice_is_made_on_the_mix_of_lengths_users_send():
    """Two variants: one faster at seq 128, the other at seq 16. Timed at the example's 128 alone the first wins; on
    a mix that is 90% short text the second does, and each size's figures come back for the report."""
    from torchship.mix import Mix
    from torchship.optimize import OptimizeOptions
    from torchship.optimize.search import Search, SearchRow
    cost = {"wide": {16: 0.0010, 128: 0.0040}, "short": {16: 0.0006, 128: 0.0060}}
    chosen = {}
    for mix in (Mix("seq", (128,), (1.0,), "given"), Mix("seq", (16, 128), (0.9, 0.1), "held-out")):
        search = Search(SimpleNamespace(opts=OptimizeOptions(batch_sizes=(8,)), mix=mix), lambda *a: None, 2,
                        flags=AVX512_VNNI)
        workers = {name: MixWorker(c) for name, c in cost.items()}
        for name, worker in workers.items():
            e = SearchRow(SimpleNamespace(name=name), VariantResult(name=name, runtime="eager", status="ok"), worker)
            search.time(e, (8,), probe=True)
            search.entries.append(e)
        search.rounds(lambda: [])
        assert all(r.mix == mix for w in workers.values() for r in w.requests)  # every timing on the mix
        results = {r.name: r for r in search.results()}
        chosen[mix.source] = select(list(results.values()), 8).chosen
        assert {s: st.throughput for s, st in results["short"].by_length.items()} == pytest.approx(
            {s: 8 / cost["short"][s] for s in mix.sizes})
    assert chosen == {"given": "wide", "held-out": "short"}


def test_a_choice_that_falls_short_on_raw_input_gives_way_to_the_next_and_none_left_keeps_the_first():
    """``optimize.raw.settle`` on scripted checks: the fastest falls short on raw input (the variant's fault), so it is
    rejected and the next fastest is chosen and checked; where the pipeline itself is at fault nothing is rejected;
    where no variant holds, the first choice stays, serving tensors only."""
    from torchship.optimize.raw import settle
    from torchship.processing import ProcessingCheck
    rows = [row("fast", 1.0, transforms=({"kind": "int8"},)), row("middle", 2.0, transforms=({"kind": "bf16"},)),
            row("slow", 4.0)]

    def result(variants):
        d = select(variants, 8)
        return SimpleNamespace(variants=tuple(variants), chosen=next((v for v in variants if d and v.name == d.chosen), None))

    def checks(passing, source=1.0):
        seen = []

        def check(c, r):
            seen.append(c.name)
            ok = c.name in passing
            return ProcessingCheck(reference="ref", items=3, cases=(), min_cosine=1.0 if ok else 0.9, max_abs_error=0.1,
                                   inputs_equal=True, passed=ok, floor=0.999, source_min_cosine=source), \
                None if ok else f"{c.name} fell short"
        return check, seen
    check, seen = checks({"middle"})
    r, found, why, rejected = settle(result(rows), check, result)
    assert r.chosen.name == "middle" and found.passed and why is None and seen == ["fast", "middle"]
    assert rejected == [("fast", "fast fell short")]
    assert next(v for v in r.variants if v.name == "fast").status == "rejected"
    assert next(v for v in r.variants if v.name == "fast").reason == "raw input: fast fell short"

    check, seen = checks(set(), source=0.98)  # the source model disagrees too: the pipeline's fault, no variant's
    r, found, why, rejected = settle(result(rows), check, result)
    assert r.chosen.name == "fast" and why == "fast fell short" and rejected == [] and seen == ["fast"]

    check, seen = checks(set())
    r, found, why, rejected = settle(result(rows), check, result)
    assert r.chosen.name == "fast" and found is None and rejected == [] and seen == ["fast", "middle", "slow"]
    assert why.startswith("no variant within budget kept its answers on it (fast, middle, slow")
    assert all(v.status == "ok" for v in r.variants)


def test_the_floor_on_raw_input_is_the_budget_s_for_a_compressed_variant_and_its_own_error_s_for_a_task_metric():
    import msgspec
    from torchship.optimize.raw import floor
    plain, int8 = row("eager", 1.0), row("eager+int8", 1.0, transforms=({"kind": "int8"},))
    assert floor({"cosine": 0.999, "top1": 0.99}, plain) == 0.9999
    assert floor({"cosine": 0.995}, int8) == 0.995
    assert floor({"retrieval": 0.95}, plain) == 0.9999
    # retrieval is the measure: as the inputs beyond the verification items, 3x its own relative error (0.1 -> 0.3,
    # cosine 0.955 for unit vectors), or 2% where that is smaller; unknown error, no floor
    retrieval = {"retrieval": 0.95}
    with_error = lambda e: msgspec.structs.replace(int8, fidelity=msgspec.structs.replace(int8.fidelity, relative_error=e))
    assert floor(retrieval, with_error(0.1)) == pytest.approx(0.955)
    assert floor(retrieval, with_error(0.001)) == pytest.approx(0.9998)
    assert floor(retrieval, int8) == 0.0


def test_a_variant_that_held_its_floors_on_calibration_but_misses_them_held_out_says_to_calibrate_on_like_data():
    """int8 with accuracy control keeps the budget's floors on the calibration data; where verification on the
    held-out data then rejects it on one of those floors, the reason says the two data differ and what to give."""
    from torchship import Budget
    from torchship.optimize import OptimizeOptions
    from torchship.optimize.search import Search
    from torchship.verify import compare
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 16)).astype(np.float32)
    budget = Budget.parse("retrieval=0.95")
    missed = compare({"e": ref}, {"e": ref + 0.6 * rng.standard_normal(ref.shape).astype(np.float32)}, budget, "embed")
    assert not missed.passed and missed.reason.startswith("retrieval")
    ws = SimpleNamespace(opts=OptimizeOptions(budget=budget), mix=None, pool=SimpleNamespace(inputs={"x": ref}),
                         model=SimpleNamespace(calibration_data={"x": ref[:8]}))
    search = Search(ws, lambda *a: None, 1, flags=AVX512_VNNI)
    controlled = SimpleNamespace(options=BuildOptions(quantize="int8_mixed", floors={"retrieval": 0.95}))
    told = search._calibration_unlike(missed, controlled)
    assert told.reason.startswith(missed.reason) and "on the 8 calibration inputs" in told.reason
    assert "--calibration-data" in told.reason and not told.passed
    assert search._calibration_unlike(missed, SimpleNamespace(options=BuildOptions(quantize="int8"))) == missed
    other = SimpleNamespace(options=BuildOptions(quantize="int8_mixed", floors={"cosine": 0.999}))
    assert search._calibration_unlike(missed, other) == missed  # missed a floor it did not keep: nothing to say
    scale = Fidelity(0.1, 0.9995, 0.99, None, None, None, False, "relative error 0.2 > 0.089: the outputs are off in "
                     "scale, which cosine does not see", 0.2)
    assert search._calibration_unlike(scale, other) == scale  # not the cosine floor it kept


def test_the_search_builds_in_as_few_stages_as_the_variants_dependencies_allow(monkeypatch):
    """A stage takes every variant, in the plan's order, that needs no result from one in it or left for later:
    eager's int8 variants build beside ONNX Runtime's and the first pruning level (in the plan's order, the first
    variant that waited on the stage ended it: four stages, with a core idle at the end of each); the same transform
    on compile waits for eager's verdict on it, and a pruning level for the gentler one's."""
    from torchship.optimize import build_each
    from torchship.optimize.search import Search
    from torchship.optimize.workspace import Workspace
    from torchship.plan import VariantPlan
    stages = []
    monkeypatch.setattr(Search, "build_all", lambda self, items: stages.append([vp.name for vp, _, _ in items]))
    monkeypatch.setattr(Search, "rounds", lambda self, pids: None)
    opts = SimpleNamespace(time_budget_s=None, exhaustive=False, batch_sizes=(8,), target=8, latency_slo_ms=None,
                           seconds_per_size=1.0)
    ws = SimpleNamespace(opts=opts, lineage=Workspace.lineage, derived={}, pids=lambda: [])
    plan = [VariantPlan("eager", "eager"), VariantPlan("onnxrt", "onnxrt"),
            VariantPlan("eager+int8", "eager", parent="eager"), VariantPlan("eager+ao-int8", "eager", parent="eager"),
            VariantPlan("compile+ao-int8", "compile", parent="compile", sibling="eager+ao-int8"),
            VariantPlan("onnxrt+int8", "onnxrt", parent="onnxrt"),
            VariantPlan("eager+prune30", "eager", parent="eager", family="prune", level=0),
            VariantPlan("eager+prune50", "eager", parent="eager", family="prune", level=1)]
    build_each(plan, ws, lambda *a: None, None, None)
    assert stages == [["eager", "onnxrt"], ["eager+int8", "eager+ao-int8", "onnxrt+int8", "eager+prune30"],
                      ["compile+ao-int8", "eager+prune50"]]


def test_a_stage_starts_the_builds_expected_longest_first(monkeypatch):
    """int8 with accuracy control first (a search of quantizations), then by how long each variant's plain runtime
    took to build in this search (compile's 48 s before ONNX Runtime's 18 s and eager's 12 s), the plan's order among
    equals: the stage's last build is a short one, not aoti-bf16 alone with a core idle."""
    from torchship.optimize.search import Search, SearchRow
    from torchship.optimize.workspace import Workspace
    from torchship.plan import VariantPlan
    opts = SimpleNamespace(time_budget_s=None, exhaustive=False, batch_sizes=(8,), target=8, latency_slo_ms=None,
                           seconds_per_size=1.0)
    search = Search(SimpleNamespace(opts=opts, lineage=Workspace.lineage), lambda *a: None, 9)
    # (build, worker seconds): torch.compile compiles on the first call, after its "build"
    for name, (built, wall) in (("eager", (3.0, 12.0)), ("compile", (0.5, 48.0)), ("onnxrt", (12.0, 18.0)),
                                ("openvino", (9.0, 14.0))):
        search.entries.append(SearchRow(VariantPlan(name, name), VariantResult(name=name, runtime=name, status="ok",
                                                                               build_s=built, wall_s=wall)))
    started = []
    monkeypatch.setattr(Search, "_start", lambda self, vp, program, training: started.append(vp.name))
    stage = [VariantPlan("eager+int8", "eager", parent="eager"), VariantPlan("onnxrt+int8", "onnxrt", parent="onnxrt"),
             VariantPlan("openvino+int8-mixed", "openvino", BuildOptions(quantize="int8_mixed"), parent="openvino"),
             VariantPlan("eager-bf16", "eager", parent="eager"), VariantPlan("compile-bf16", "compile", parent="compile")]
    search.build_all([(vp, None, None) for vp in stage])
    assert started == ["openvino+int8-mixed", "compile-bf16", "onnxrt+int8", "eager+int8", "eager-bf16"]


def test_a_budget_spent_while_a_stage_builds_leaves_the_rest_of_it_as_rows_that_say_so(monkeypatch):
    """A stage is planned at its start; a --time-budget of 10 s passes three quarters (the clock injected) while its
    first build runs, so the builds not started yet are rows with the reason (a candidate is already built)."""
    from torchship.optimize.search import Search, SearchRow
    from torchship.optimize.workspace import Workspace
    from torchship.plan import VariantPlan
    now = [0.0]
    opts = SimpleNamespace(time_budget_s=10.0, exhaustive=False, batch_sizes=(8,), target=8, latency_slo_ms=None,
                           seconds_per_size=1.0)
    search = Search(SimpleNamespace(opts=opts, lineage=Workspace.lineage), lambda *a: None, 4, clock=lambda: now[0])
    search.entries.append(SearchRow(VariantPlan("eager", "eager"), VariantResult(name="eager", runtime="eager",
                                                                                 status="ok")))
    started = []

    def start(self, vp, program, training):
        started.append(vp.name)
        now[0] = 8.0  # the build took the budget past 7.5 s
    monkeypatch.setattr(Search, "_start", start)
    stage = [VariantPlan("onnxrt", "onnxrt"), VariantPlan("openvino", "openvino"), VariantPlan("aoti", "aoti")]
    search.build_all([(vp, None, None) for vp in stage])
    rows = {e.plan.name: e.result for e in search.entries}
    assert started == ["onnxrt"]
    for name in ("openvino", "aoti"):
        assert rows[name].status == "skipped" and "time budget of 10 s was spent" in rows[name].reason


def test_a_gain_under_two_percent_is_a_tie_however_narrow_its_interval():
    """A model that sleeps times every variant alike: eager-bf16 ahead of eager by 0.5% in every round, an interval
    of the paired ratio well above 1 ([1.005-1.005]), is still a tie, and the tie goes to the uncompressed eager;
    10% ahead in every round is a win."""
    def rows(gain):
        out = []
        for name, transforms, ms in (("eager", (), 1.0), ("eager-bf16", ({"kind": "bf16"},), 1.0 / gain)):
            per_round = [[ms / 1e3 * (1 + 0.05 * r)] * 20 for r in range(8)]  # rounds move together (load)
            out.append(VariantResult(name=name, runtime="eager", status="ok", selectable=True, transforms=transforms,
                                     fidelity=Fidelity(0.0, 1.0, 1.0, None, None, None, True, ""),
                                     profile={8: stats(8, per_round)}, samples={8: per_round}))
        return out
    d = select(rows(1.005), 8)
    assert d.chosen == "eager" and d.tied == ("eager-bf16",) and not d.beyond_noise
    assert d.paired_rounds == 8 and d.paired[2] < 1.0  # eager-bf16's time over eager's: 0.995 every round
    assert "a gain under 2% is a tie" in d.why and "eager is uncompressed" in d.why
    d = select(rows(1.10), 8)
    assert d.chosen == "eager-bf16" and d.beyond_noise
