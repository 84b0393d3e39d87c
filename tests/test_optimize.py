"""End to end on digits-cnn with every runtime, and the TorchScript trace checks."""
import json
from dataclasses import replace

import numpy as np
import pytest

from torchship import OptimizeOptions, TensorSpec, load_bundle, optimize
from torchship.report import ratios
from torchship.select import select, simplicity
from torchship.runtimes import LoadContext, get
from torchship.runtimes.base import BuildOptions
from torchship.sources import load_source
from torchship.zoo.digits import dataset

pytestmark = pytest.mark.slow


def test_every_runtime_builds_verifies_and_times(digits_run):
    by_name = {v.name: v for v in digits_run.variants}
    assert set(by_name) == {"eager-naive", "eager", "torchscript", "compile", "aoti", "onnxrt", "openvino"}
    for name in ("eager", "torchscript", "compile", "aoti", "onnxrt"):
        v = by_name[name]
        assert v.status == "ok", (name, v.reason)
        assert v.fidelity.cosine >= 0.999 and v.fidelity.top1 >= 0.99
        # held-out digits with labels give the task metric: the trained model's, kept by every variant
        assert v.fidelity.reference_accuracy >= 0.9 and v.fidelity.accuracy >= v.fidelity.reference_accuracy - 0.01
        for bs in (1, 8):
            s = v.profile[bs]
            assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms and s.throughput > 0
        assert v.artifact_bytes > 0 and v.cold_start_s > 0
        assert v.lineage.parent == "model" and v.lineage.step == name
    assert by_name["eager-naive"].selectable is False and digits_run.chosen.name != "eager-naive"
    assert ratios(digits_run)["eager"].vs_eager == pytest.approx(1.0)


def test_the_choice_is_the_decision_on_its_own_figures_and_the_report_explains_it(digits_run):
    """The chosen variant is what select() decides on the recorded figures: the fastest, or one tied with it within
    the noise; report.md opens with that decision in words, the budget with its values and how quiet the machine was."""
    d = digits_run.decision
    assert select(digits_run.variants, 8) == d and d.chosen == digits_run.chosen.name and digits_run.chosen_batch_size == 8
    ok = [v for v in digits_run.variants if v.ok and v.selectable]
    by = {v.name: v for v in ok}
    assert d.fastest == max(ok, key=lambda v: v.profile[8].throughput).name
    # the fastest, or one within the noise of it that is simpler (a tie is settled by simplicity, never by luck)
    assert d.chosen == d.fastest or (d.chosen in d.tied and simplicity(by[d.chosen]) < simplicity(by[d.fastest]))
    assert not d.beyond_noise or d.margin > 1.0
    for v in ok:  # every figure has its interval, from several rounds for the contenders
        lo, hi = v.profile[8].throughput_interval
        assert lo <= v.profile[8].throughput <= hi
    assert digits_run.chosen.profile[8].rounds >= 3
    md = (digits_run.report).read_text().splitlines()
    assert md[2].startswith("**Chose ") and d.why in md[4]
    text = "\n".join(md)
    assert "Budget in force: cosine >= 0.999, top1 >= 0.99" in text and "Timing: interleaved rounds" in text
    assert ("the machine was quiet" in text.lower()) != ("the machine was busy" in text.lower())
    assert "Search: 7 variants planned" in text


def test_bundle_loads_and_answers_like_the_model(digits_run):
    loaded = load_bundle(digits_run.bundle)
    manifest = loaded.manifest
    assert manifest.runtime == digits_run.chosen.runtime
    assert manifest.spec.inputs[0] == TensorSpec("image", "float32", ("batch", 1, 28, 28))
    assert manifest.fidelity.passed and 8 in manifest.profile
    x, y = dataset()["test"]
    pred = loaded({"image": x[:64]})["logits"].argmax(1)
    assert (pred == y[:64]).mean() >= 0.95
    report = digits_run.bundle / "report"
    assert {p.name for p in report.iterdir()} == {"report.json", "report.md", "latency.png", "pareto.png"}
    assert "chose" in (report / "report.md").read_text()
    data = json.loads((report / "report.json").read_text())
    assert data["machine"]["threads"] >= 1 and "isa" in data["machine"]
    assert data["bundle"] == str(digits_run.bundle) and data["report"] == str(digits_run.report)


@pytest.mark.parametrize("runtime", ["eager", "torchscript", "compile", "aoti", "onnxrt"])
def test_each_packaged_runtime_reloads_from_its_own_bundle(runtime, tmp_path):
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=(runtime,), batch_sizes=(2,), seconds_per_size=0.05,
                                                     transforms=()), out=tmp_path / "b")
    assert res.chosen.name == runtime
    import torch._inductor.config
    freezing = torch._inductor.config.freezing
    loaded = load_bundle(res.bundle, trust_code=runtime in ("aoti", "eager", "compile"))  # native or the zoo's own code
    x = dataset()["test"][0][:5]
    loaded({"image": x})  # compiles, for torch.compile: with freezing as its own option, not the process's
    assert torch._inductor.config.freezing == freezing
    model = load_source("zoo:digits-cnn").module
    import torch
    with torch.inference_mode():
        want = model(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(loaded({"image": x})["logits"], want, rtol=1e-4, atol=1e-4)


def test_data_dependent_control_flow_is_never_silently_mis_traced(tmp_path):
    model = load_source("tests.models:Branchy", ["x:float32[batch,8]"])
    artifact = get("torchscript").build(model, BuildOptions(), tmp_path)
    assert artifact.options.mode == "script"
    assert "data-dependent control flow" in artifact.options.notes[0]
    runner = get("torchscript").load(artifact, tmp_path, model.spec, LoadContext())
    for sign in (1, -1):
        x = sign * np.abs(np.random.default_rng(0).standard_normal((3, 8))).astype(np.float32)
        import torch
        with torch.inference_mode():
            want = model.module(torch.from_numpy(x))[0].numpy()
        np.testing.assert_allclose(runner({"x": x})["output"], want, rtol=1e-5, atol=1e-6)


def test_unscriptable_control_flow_is_skipped_with_the_reason():
    res = optimize("tests.models:Unscriptable", OptimizeOptions(runtimes=("eager", "torchscript"), batch_sizes=(2,),
                   seconds_per_size=0.05), inputs=["x:float32[batch,8]"])
    ts = res.variant("torchscript")
    assert ts.status == "skipped"
    assert "data-dependent control flow" in ts.reason and "script failed" in ts.reason
    assert res.chosen.name == "eager"


def test_a_second_run_reuses_the_builds(tmp_path, monkeypatch):
    """Same model, weights, data and options: the artifacts come from the build cache, and load to the same answers;
    other weights miss it."""
    monkeypatch.setenv("TORCHSHIP_CACHE", str(tmp_path / "cache"))
    opts = OptimizeOptions(runtimes=("torchscript", "onnxrt"), batch_sizes=(4,), seconds_per_size=0.05, transforms=())
    first = optimize("tests.models:Tiny", opts, out=tmp_path / "a")
    second = optimize("tests.models:Tiny", opts, out=tmp_path / "b")
    assert not any(v.cached for v in first.variants)
    assert all(v.cached for v in second.variants if v.ok)
    x = {"x": np.ones((3, 8), np.float32)}
    np.testing.assert_array_equal(load_bundle(tmp_path / "a")(x)["output"], load_bundle(tmp_path / "b")(x)["output"])
    from safetensors.torch import save_file
    import torch
    save_file({k: torch.randn_like(v) for k, v in load_source("tests.models:Tiny").module.module.state_dict().items()},
              str(tmp_path / "other.safetensors"))
    third = optimize("tests.models:Tiny", opts, weights=str(tmp_path / "other.safetensors"))
    assert not any(v.cached for v in third.variants)
    fourth = optimize("tests.models:Tiny", replace(opts, cache=False))  # --no-cache: built again, though cached
    assert not any(v.cached for v in fourth.variants) and fourth.chosen is not None


def test_a_time_budget_spent_leaves_rows_that_say_so_and_still_a_bundle(tmp_path):
    """A budget that is spent before the first build (a microsecond: no machine is that fast, so nothing here depends
    on this one's speed): the first candidate is still built, so there is a bundle; every other is a row with the
    reason and what to do."""
    res = optimize("tests.models:Tiny", OptimizeOptions(runtimes=("eager", "torchscript", "onnxrt"), batch_sizes=(4,),
                                                        seconds_per_size=0.05, transforms=(), time_budget_s=1e-6,
                                                        cache=False), out=tmp_path / "b")
    by = {v.name: v for v in res.variants}
    assert by["eager"].status == "ok" and res.chosen.name == "eager" and (tmp_path / "b" / "manifest.json").exists()
    for name in ("torchscript", "onnxrt"):
        assert by[name].status == "skipped" and "time budget of 1e-06 s was spent" in by[name].reason
        assert "raise --time-budget" in by[name].reason


def _job_servers() -> list[int]:
    """This process's children that are variant fork servers (``python -m torchship.optimize.job``)."""
    import os
    from pathlib import Path
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"torchship.optimize.job" in cmd:
            found.append(int(proc.name))
    return found


def test_the_worker_server_starts_before_the_model_loads_and_a_source_that_fails_leaves_none_behind(tmp_path,
                                                                                                  monkeypatch):
    """optimize starts the workers' fork server first (its imports overlap loading the model): where loading then
    fails, the error comes at once and neither the server nor its directory is left."""
    import tempfile

    from torchship.errors import SourceError
    from torchship.optimize import workers
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    started = []
    real = workers.ForkServer.__init__
    monkeypatch.setattr(workers.ForkServer, "__init__", lambda self, *a: started.append(1) or real(self, *a))
    with pytest.raises(SourceError, match="is not a source torchship knows"):
        optimize("no_such_source_anywhere")
    assert started == [1] and not _job_servers() and not list(tmp_path.glob("torchship-forkserver-*"))
