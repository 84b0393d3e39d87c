"""Variants trained from the model (QAT, channel pruning + fine-tuning, a distilled student) take part in optimize."""
import numpy as np
import pytest

from torchship import Budget, OptimizeOptions, load_bundle, optimize
from torchship.report import ratios
from torchship.zoo.digits import dataset

pytestmark = pytest.mark.slow


def test_trained_variants_are_verified_timed_and_held_to_the_budget(tmp_path):
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(32,), seconds_per_size=0.05,
                                                     transforms=("qat", "channels", "distill"),
                                                     budget=Budget.parse("accuracy_drop=0.01")),
                   train_data="zoo:digits", out=tmp_path / "b")
    by = {v.name: v for v in res.variants}
    assert set(by) == {"eager-naive", "onnxrt", "onnxrt+qat-int8", "onnxrt+channels30", "onnxrt+channels50",
                       "onnxrt+channels70", "onnxrt+student"}
    base, bought = by["onnxrt"], ratios(res)
    for name in ("onnxrt+qat-int8", "onnxrt+channels30", "onnxrt+student"):
        v = by[name]
        assert v.status in ("ok", "rejected"), (name, v.reason)
        assert v.training.epochs >= 1 and "val_acc" in v.training.val
        f = v.fidelity
        # judged on the task metric: the accuracy budget decides, not closeness of the logits
        assert (v.status == "ok") == (f.reference_accuracy - f.accuracy <= 0.01), (name, f)
        assert bought[name].vs_runtime and bought[name].size_vs_runtime, name  # what it bought over plain onnxrt
        assert v.lineage.parent == "model" and "trained from the model" in v.lineage.step
        # judged on other batches; a retrained model's answers on values past the data's range only reported
        assert "batch 1" in v.fidelity.checked and any(c.startswith("values x2 (reported, not judged") for c in v.fidelity.checked)
    assert by["onnxrt+qat-int8"].status == "ok", by["onnxrt+qat-int8"].fidelity  # QAT holds accuracy on digits
    assert by["onnxrt+channels30"].artifact_bytes < 0.8 * base.artifact_bytes
    assert by["onnxrt+student"].artifact_bytes < 0.5 * base.artifact_bytes  # half the width: about a quarter
    chans = [by[f"onnxrt+channels{n}"] for n in (30, 50, 70)]
    if "rejected" in [c.status for c in chans]:  # gentle to aggressive: nothing past the first failure is trained
        first = [c.status for c in chans].index("rejected")
        assert all(c.status == "skipped" and "gentler channels" in c.reason for c in chans[first + 1:])
    assert res.chosen.fidelity.passed and res.chosen.status == "ok"
    report = (res.report).read_text()
    assert "What each transform bought" in report and "onnxrt+qat-int8" in report.split("What each transform bought")[1]
    x, y = dataset()["test"]
    out = load_bundle(res.bundle)({"image": x})["logits"]
    assert (out.argmax(1) == y).mean() == pytest.approx(res.chosen.fidelity.accuracy, abs=0.02)


def test_training_data_that_does_not_fit_is_one_line_and_the_rest_runs(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((40, 5), np.float32), y=np.zeros(40, np.int64))
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(8,), seconds_per_size=0.02,
                                                     transforms=("qat", "distill")), train_data=bad)
    by = {v.name: v for v in res.variants}
    assert by["onnxrt"].status == "ok" and res.chosen.name == "onnxrt"
    for name in ("onnxrt+qat-int8", "onnxrt+student"):
        assert by[name].status == "skipped" and "do not fit the model" in by[name].reason
    lines = []
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(8,), seconds_per_size=0.02,
                                                     transforms=("qat",)), train_data=tmp_path / "missing.npz",
                   warn=lines.append)
    assert len(lines) == 1 and "--train-data" in lines[0] and res.chosen.name == "onnxrt"
    assert not any("qat" in v.name for v in res.variants)


def test_distillation_without_a_smaller_architecture_says_what_to_pass():
    res = optimize("tests.models:Tiny", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(8,), seconds_per_size=0.02,
                                                        transforms=("distill",)),
                   train_data=(np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32),
                               np.random.default_rng(1).integers(0, 4, 64)))
    row = res.variant("onnxrt+student")
    assert row.status == "skipped" and "--student" in row.reason
