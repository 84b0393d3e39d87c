"""CUDA paths: cudnn.benchmark for fixed shapes, fp16/bf16 variants. Skipped cleanly without a GPU."""
import pytest
import torch

from torchship import OptimizeOptions, load_bundle, optimize
from torchship.zoo.digits import dataset

@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_plan_verifies_lower_precision_and_bundle_runs_on_gpu(tmp_path):
    res = optimize("zoo:digits-cnn", OptimizeOptions(device="cuda", runtimes=("eager", "aoti", "onnxrt"),
                   batch_sizes=(1, 64), seconds_per_size=0.2, exhaustive=True), out=tmp_path / "b")
    by = {v.name: v for v in res.variants}
    assert {"eager-fp16", "eager-bf16", "aoti-fp16", "aoti-bf16"} <= set(by)
    # every shortfall at once (a GPU is lent rarely: one run should show them all)
    names = ("eager", "aoti", "eager-fp16", "aoti-fp16")
    assert {n: by[n].reason for n in names if by[n].status != "ok"} == {}
    assert {n: by[n].peak_memory_kind for n in names} == dict.fromkeys(names, "cuda allocated")
    assert by["eager"].options.fixed_shapes is True  # cudnn.benchmark on: no dynamic dims but batch
    assert by["onnxrt"].status in ("ok", "skipped")  # skipped, with the reason, without onnxruntime-gpu
    loaded = load_bundle(res.bundle)
    x, y = dataset()["test"]
    assert (loaded({"image": x[:64]})["logits"].argmax(1) == y[:64]).mean() >= 0.95


def test_optimize_refuses_cuda_without_a_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from torchship import UsageError
    with pytest.raises(UsageError, match="no CUDA device"):
        OptimizeOptions(device="cuda")


@pytest.mark.gpu
def test_cuda_checks_measure_on_a_gpu():
    from torchship.inspect import check as c
    from torchship.sources import load_source
    model = load_source("zoo:digits-cnn")
    unused = c.cuda_unused(model, "cpu")
    assert unused.status in ("found", "ok", "inconclusive") and "on the CPU and" in unused.evidence
    assert c.cuda_unused(model, "cuda").status == "ok"
    assert c.cudnn(model, "cuda").status != "n/a"  # measured, whatever it finds; never "does not apply" here
