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
