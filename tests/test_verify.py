import numpy as np
import pytest

from torchship import Budget, UsageError
from torchship.verify import compare


def test_budget_parse():
    assert Budget.parse(None) == Budget()
    b = Budget.parse("cosine=0.99,top1=0.9,accuracy_drop=0.01")
    assert (b.min_cosine, b.min_top1, b.max_accuracy_drop) == (0.99, 0.9, 0.01)
    for bad in ("cosine", "speed=1", "cosine=abc", "cosine=2"):
        with pytest.raises(UsageError):
            Budget.parse(bad)


def test_compare_exact_and_perturbed():
    rng = np.random.default_rng(0)
    ref = {"logits": rng.standard_normal((50, 10)).astype(np.float32)}
    labels = ref["logits"].argmax(1)
    same = compare(ref, {"logits": ref["logits"].copy()}, Budget(), "classify", labels)
    assert same.passed and same.cosine == pytest.approx(1.0) and same.top1 == 1.0 and same.max_abs_error == 0
    noisy = {"logits": ref["logits"] + rng.standard_normal((50, 10)).astype(np.float32)}
    bad = compare(ref, noisy, Budget(), "classify", labels)
    assert not bad.passed and "cosine" in bad.reason and bad.accuracy < 1.0
    nan = compare(ref, {"logits": np.full_like(ref["logits"], np.nan)}, Budget(), "classify")
    assert not nan.passed and "non-finite" in nan.reason
    shape = compare(ref, {"logits": ref["logits"][:, :5]}, Budget())
    assert not shape.passed and "shape" in shape.reason


def test_accuracy_budget():
    ref = {"logits": np.eye(10, dtype=np.float32)[np.arange(100) % 10]}
    labels = np.arange(100) % 10
    out = ref["logits"].copy()
    out[:3] = np.roll(out[:3], 1, axis=1)  # three wrong answers: 3 points lost
    budget = Budget(min_cosine=0.0, min_top1=0.0, max_accuracy_drop=0.01)
    res = compare(ref, {"logits": out}, budget, "classify", labels)
    assert not res.passed and "accuracy drop 3.00%" in res.reason
    # with labels, an accuracy budget is the measure: the logits may move as long as the task metric holds ...
    assert compare(ref, {"logits": out}, Budget(max_accuracy_drop=0.05), "classify", labels).passed
    # ... unless a floor is also set; and without labels the default fidelity floors apply
    assert "cosine" in compare(ref, {"logits": out}, Budget(min_cosine=0.999, max_accuracy_drop=0.05), "classify", labels).reason
    assert "cosine" in compare(ref, {"logits": out}, Budget(max_accuracy_drop=0.05), "classify").reason


def test_a_scaled_answer_fails_though_its_cosine_is_one():
    rng = np.random.default_rng(0)
    ref = {"y": rng.standard_normal((20, 8)).astype(np.float32)}
    scaled = compare(ref, {"y": ref["y"] * 1.5}, Budget())
    assert scaled.cosine == pytest.approx(1.0) and not scaled.passed and "off in scale" in scaled.reason
    assert compare(ref, {"y": ref["y"] * (1 + 1e-4)}, Budget()).passed


def test_a_flip_between_near_tied_logits_is_not_a_flip():
    ref = np.array([[1.0, 0.9999, 0.0], [3.0, 0.0, 0.0]] * 50, np.float32)
    out = ref + np.float32(2e-4) * np.random.default_rng(0).standard_normal(ref.shape).astype(np.float32)  # its noise
    out[0] = [0.9999, 1.0, 0.0]  # the reference's top two were within the variant's error of each other
    fid = compare({"logits": ref}, {"logits": out}, Budget(), "classify")
    assert fid.top1 == 1.0 and fid.near_ties >= 1 and fid.passed  # every flip was between near-tied logits
    out[1] = [0.0, 3.0, 0.0]  # a clear winner changed: that is a flip
    assert compare({"logits": ref}, {"logits": out}, Budget(), "classify").top1 < 1.0


def test_inputs_beyond_the_example_catch_what_the_example_hides():
    from torchship.verify import beyond_the_example
    ref = {"y": np.ones((4, 3), np.float32)}
    cases = [("batch 1", {}, ref), ("values x2", {}, ref)]
    checked, worst, reason = beyond_the_example(1e-6, cases, [ref, {"y": ref["y"] * 2.25}], {})
    assert checked == ("batch 1", "values x2") and worst == pytest.approx(1.25) and "values x2" in reason
    assert beyond_the_example(1e-6, cases, [ref, ref], {})[2] is None
    _, _, reason = beyond_the_example(0.0, cases, [None, ref], {0: "RuntimeError: expected batch 2"})
    assert "fails on inputs the example did not cover (batch 1): RuntimeError" in reason
    # a compressed variant keeps its own numeric slack: 3x its error on the verification inputs
    assert beyond_the_example(0.05, cases, [ref, {"y": ref["y"] * 1.1}], {})[2] is None


def test_a_batch_case_is_judged_against_the_variants_own_error_on_the_same_items():
    """Batch 1 is one verification item again: a quantized variant whose error on that item was 0.12 in the
    verification run (0.01 over the whole pool, whose larger outputs weigh more) is not said to diverge there at
    0.13; at 0.5 it is, and the reason names what it was held to."""
    from torchship.verify import beyond_the_example
    ref = {"y": np.ones((1, 4), np.float32)}
    cases = [("batch 1", {}, ref), ("seq=3", {}, ref)]
    off = lambda e: {"y": ref["y"] * (1 + e)}  # noqa: E731 (relative error e)
    assert "batch 1" in beyond_the_example(0.01, cases, [off(0.13), ref], {})[2]  # against the pool's 0.01
    assert beyond_the_example(0.01, cases, [off(0.13), ref], {}, own={0: 0.12})[2] is None
    reason = beyond_the_example(0.01, cases, [off(0.5), ref], {}, own={0: 0.12})[2]
    assert "(batch 1): relative error 0.5, against 0.12 on the same items in the verification run" in reason
    # the other cases keep the pool's error as their yardstick
    assert "seq=3" in beyond_the_example(0.01, cases, [off(0.13), off(0.13)], {}, own={0: 0.12})[2]


def test_the_search_holds_a_batch_case_to_the_variants_error_on_its_items_and_survives_misshapen_outputs(tmp_path):
    """The search's side of it: item 1 is small, so the variant's 10% error on it in the verification run is a small
    share of the pool's error; at batch 1 that item again 12% off is the variant's usual error there, not a
    divergence. A variant whose pool outputs do not fit the reference's (already rejected for it) is judged
    against the pool's error instead, without failing the search."""
    from types import SimpleNamespace

    from torchship.optimize import OptimizeOptions
    from torchship.optimize.protocol import Built
    from torchship.optimize.search import Search
    from torchship.verify import Budget, compare
    reference = {"y": np.full((8, 4), 10.0, np.float32)}
    reference["y"][1] = 0.1  # the small item
    pooled = {"y": reference["y"].copy()}
    pooled["y"][1] *= 1.1
    item = [1]
    case = ("batch 1", {"x": np.zeros((1, 2), np.float32)}, {"y": reference["y"][item]})
    np.savez(tmp_path / "extra.npz", **{"0|y": reference["y"][item] * 1.12})
    built = Built(status="ok", extra_outputs=str(tmp_path / "extra.npz"))
    vp = SimpleNamespace(derived=None, runtime="eager", options=SimpleNamespace(quantize=None), selectable=True)

    def judged(outputs, items):
        ws = SimpleNamespace(opts=OptimizeOptions(), mix=None, extra=[case], extra_items=items, reference=reference)
        search = Search(ws, lambda *a: None, 1, flags=frozenset())
        return search._beyond_the_example(compare(reference, outputs, Budget()), built, vp, outputs)
    assert judged(pooled, {0: np.array(item)}).passed
    assert "batch 1" in judged(pooled, {}).reason  # against the pool's error (0.0001), 0.12 is a divergence
    misshapen = {"y": pooled["y"][:1]}  # no row for item 1
    fid = judged(misshapen, {0: np.array(item)})
    assert not fid.passed and "shape" in fid.reason


def test_extra_batch_cases_take_verification_items():
    from types import SimpleNamespace
    from torchship.spec import IOSpec
    from torchship.verify import extra_cases
    spec = IOSpec.parse(["x:float32[batch,8]"], ["y:float32[batch,4]"])
    pool = {"x": np.arange(80, dtype=np.float32).reshape(10, 8)}
    cases = {label: (feeds, items) for label, feeds, items in
             extra_cases(SimpleNamespace(spec=spec, dims={}), None, items=pool)}
    for label, n in (("batch 1", 1), ("batch 5", 5)):
        feeds, items = cases[label]
        assert len(items) == n and np.array_equal(feeds["x"], pool["x"][items])
    assert cases["values x2"][1] is None


def test_a_calibrated_quantization_is_not_judged_on_values_beyond_its_calibration():
    from torchship.verify import beyond_the_example
    ref = {"y": np.ones((4, 3), np.float32)}
    cases = [("batch 1", {}, ref), ("values x2", {}, ref)]
    saturated = [ref, {"y": ref["y"] * 0.6}]
    assert "values x2" in beyond_the_example(0.01, cases, saturated, {})[2]
    checked, worst, reason = beyond_the_example(0.01, cases, saturated, {}, "calibrated ranges")
    assert reason is None and worst == 0.0 and checked[1] == "values x2 (reported, not judged: calibrated ranges)"
    assert "batch 1" in beyond_the_example(0.01, cases, [{"y": ref["y"] * 3}, ref], {}, "calibrated ranges")[2]


def test_a_retrieval_budget_measures_what_embeddings_are_used_for():
    """Nearest neighbours kept and the rank correlation of pairwise similarities, against fp32; with
    --budget retrieval=R it is the measure for an embedding model (cosine only where set)."""
    from torchship.verify import Budget, compare, retrieval
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 32)).astype(np.float32)
    close = ref + 0.02 * rng.standard_normal(ref.shape).astype(np.float32)  # cosine ~0.9998: neighbours kept
    rough = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)  # cosine ~0.96
    shuffled = rng.permutation(ref)  # every item another's vector: nothing kept
    kept, rho = retrieval(ref, close)
    assert kept > 0.9 and rho > 0.99
    assert retrieval(ref, shuffled)[0] < 0.3
    assert retrieval(ref, ref) == (1.0, 1.0)
    f = compare({"e": ref}, {"e": rough}, Budget(), task="embed")
    assert not f.passed and "cosine" in f.reason and f.retrieval is not None  # the default cosine floor holds
    floor = retrieval(ref, rough)[0] - 0.05
    f = compare({"e": ref}, {"e": rough}, Budget(min_retrieval=floor), task="embed")
    assert f.passed, f.reason  # the retrieval floor is the measure: cosine 0.96 does not fail it
    f = compare({"e": ref}, {"e": shuffled}, Budget(min_retrieval=0.95), task="embed")
    assert not f.passed and "retrieval" in f.reason and "< 0.95" in f.reason
    assert Budget.parse("retrieval=0.95").min_retrieval == 0.95
    assert Budget(min_retrieval=0.95).in_force(embed=True) == {"retrieval": 0.95}
    assert Budget(min_retrieval=0.95).in_force(embed=False) == {"cosine": 0.999, "top1": 0.99}


def test_longer_and_shorter_inputs_beyond_the_example_are_made_of_the_held_out_items():
    """Generated token ids are random words in no order, without the [CLS] a tokenizer puts first: a calibrated int8
    checked on them diverges on what no user sends (it did: relative error 0.32 at seq 192 on MiniLM). With held-out
    items, the other lengths are those items cut, or continued by the next item's tokens."""
    from types import SimpleNamespace

    from torchship.spec import IOSpec
    from torchship.verify import extra_cases
    spec = IOSpec.parse(["input_ids:int64[batch,seq]{0:30000}", "attention_mask:int64[batch,seq]"])
    rng = np.random.default_rng(0)
    ids = rng.integers(2000, 3000, size=(10, 16))
    pool = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    model = SimpleNamespace(spec=spec, dims={"seq": 16}, branches=())
    cases = {label: feeds for label, feeds, _ in extra_cases(model, pool)}
    longer, shorter = cases["seq=24"], cases["seq=4"]
    assert longer["input_ids"].shape == (3, 24) and shorter["input_ids"].shape == (3, 4)
    first, second = ids[1], ids[8]  # the items extra_cases takes: (i * 7 + 1) % 10
    assert (longer["input_ids"][0, :16] == first).all() and (longer["input_ids"][0, 16:] == second[:8]).all()
    assert (shorter["input_ids"][0] == first[:4]).all()
    assert longer["attention_mask"][0, 12:].sum() == 0 and longer["attention_mask"][1].all()  # one item padded
    assert set(np.unique(longer["input_ids"])) <= set(np.unique(ids))
    assert pool["attention_mask"].all()  # the held-out items are left as they were
    generated = {label: feeds for label, feeds, _ in extra_cases(model, None)}["seq=24"]  # without held-out items: generated, as before
    assert generated["input_ids"].shape == (3, 24) and not set(np.unique(generated["input_ids"])) <= set(np.unique(ids))
