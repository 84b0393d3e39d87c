"""Compression transforms: outputs stay within their stated tolerance; budget logic never selects a failing variant."""
import pytest
import torch

from torchship import Budget, OptimizeOptions, UsageError, optimize
from torchship.errors import BuildSkipped
from torchship.sources import load_source
from torchship.transforms import DynamicInt8, MagnitudePrune, apply, from_dict, sparsity, to_dict


def test_configs_round_trip_and_validate():
    for config in (DynamicInt8(), MagnitudePrune(0.3)):
        assert from_dict(to_dict(config)) == config
    with pytest.raises(UsageError, match="between 0 and 1"):
        MagnitudePrune(1.5)
    with pytest.raises(UsageError, match="registered: dynamic_int8, magnitude_prune"):
        from_dict({"kind": "sparsify"})


def test_transforms_return_new_modules_within_tolerance():
    model = load_source("tests.models:Tiny").module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 8)
    with torch.inference_mode():
        want = model(x)[0]
        q = apply(model, DynamicInt8())(x)[0]
        pruned_module = apply(model, MagnitudePrune(0.3))
        p = pruned_module(x)[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    cos = torch.nn.functional.cosine_similarity
    assert cos(q, want).min() > 0.99 and (q.argmax(1) == want.argmax(1)).float().mean() >= 0.95
    assert sparsity(pruned_module) == pytest.approx(0.3, abs=0.01) and sparsity(model) == 0
    assert cos(p, want).mean() > 0.9
    conv_only = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(BuildSkipped, match="no"):
        apply(conv_only, DynamicInt8())


@pytest.mark.slow
def test_gentle_to_aggressive_and_never_selecting_a_failing_variant():
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("eager", "onnxrt"), transforms=("int8", "prune"),
                   batch_sizes=(16,), seconds_per_size=0.05, budget=Budget(min_cosine=0.9995)))
    by = {v["name"]: v for v in res.variants}
    assert by["onnxrt+int8"]["status"] in ("ok", "rejected") and by["eager+int8"]["status"] in ("ok", "rejected")
    prune = [by[f"eager+prune{n}"] for n in (30, 50, 70)]
    statuses = [p["status"] for p in prune]
    assert "rejected" in statuses  # at this budget some pruning level fails ...
    first = statuses.index("rejected")
    assert all(p["status"] == "skipped" and "gentler prune" in p["reason"] for p in prune[first + 1:])  # ... and stops
    assert prune[0].get("sparsity") == pytest.approx(0.3, abs=0.01)
    assert res.chosen["status"] == "ok" and res.chosen["fidelity"]["passed"]
    assert all(v["status"] != "ok" or v["fidelity"]["cosine"] >= 0.9995 for v in res.variants if v["selectable"])


def test_int8_artifacts_reload_to_the_same_outputs(tmp_path):
    """A bundle of eager+int8 holds fp32 weights and re-applies the quantization at load; onnxrt+int8 holds the
    quantized graph. Both reload to what the build verified."""
    import numpy as np

    from torchship.runtimes import get
    model = load_source("tests.models:Tiny")
    x = {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}
    eager_dir, ort_dir = tmp_path / "e", tmp_path / "o"
    eager_dir.mkdir(), ort_dir.mkdir()
    art = get("eager").build(model, {"transforms": [to_dict(DynamicInt8())]}, eager_dir)
    with torch.inference_mode():
        want = apply(model.module, DynamicInt8())(torch.from_numpy(x["x"]))[0].numpy()
    np.testing.assert_allclose(get("eager").load(art, eager_dir, model.spec)(x)["output"], want, rtol=1e-6, atol=1e-6)
    art = get("onnxrt").build(model, {"quantize": "dynamic_int8"}, ort_dir)
    import onnx
    ops = {n.op_type for n in onnx.load(str(ort_dir / art.files[0])).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    out = get("onnxrt").load(art, ort_dir, model.spec)(x)["output"]
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(out), torch.from_numpy(want)).min() > 0.99
