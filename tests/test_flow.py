"""Control flow on a model's values, found once before any graph is traced: where it is (the line), which variants
stay candidates (eager, compile, TorchScript script), that the chosen bundle gives the model's answer on inputs that
take the branch, and what --allow-specialization changes."""
import numpy as np
import pytest
import torch

from torchship import OptimizeOptions, load_bundle, load_source, optimize
from torchship.flow import find_branches
from torchship.inspect import check as c
from torchship.modules import to_torch

MODELS = "tests/models.py"


def branches(ref):
    m = load_source(ref)
    return find_branches(m.module.eval(), to_torch(m.spec.sample(2), m.spec.input_names))


def test_each_branch_on_values_is_found_with_its_line_and_shapes_are_not():
    (loop,) = branches("tests.models:RareRescale")
    assert loop.file.endswith(MODELS) and loop.code == "while h.abs().max() > 1000:"
    (neg,) = branches("tests.models:NegativeMean")
    assert neg.code == "if x.mean() < -1:" and str(neg).endswith(f":{neg.line} `if x.mean() < -1:`")
    assert branches("tests.models:ShapeBranch") == ()  # a branch on a shape: not data-dependent
    assert branches("tests.models:Tiny") == ()
    assert branches("tests.models:CondBranch") == ()  # torch.cond: a capture keeps both sides


def _eager(ref, x):
    m = load_source(ref)
    with torch.inference_mode():
        return m.module(torch.from_numpy(x))[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("ref, rare", [
    ("tests.models:RareRescale", lambda x: x * 1e4),  # activations past 1,000: the loop runs
    ("tests.models:NegativeMean", lambda x: -np.abs(x) - 2.0),  # a mean below -1: the other branch
])
def test_traced_variants_are_not_candidates_and_the_bundle_takes_the_branch(ref, rare, tmp_path):
    opts = OptimizeOptions(runtimes=("eager", "torchscript", "onnxrt"), transforms=(), batch_sizes=(4,),
                           seconds_per_size=0.02)
    res = optimize(ref, opts, out=tmp_path / "b")
    onnx = res.variant("onnxrt")
    assert onnx.status == "skipped" and "branches on its values at" in onnx.reason and "models.py:" in onnx.reason
    assert "--allow-specialization" in onnx.reason
    ts = res.variant("torchscript")
    assert ts.status == "ok" and ts.artifact.options.mode == "script"
    # script was checked on values pushed far both ways (where the rare side of the branch is taken), and passed
    assert {"values x10000", "values shifted -10", "values shifted +10"} <= set(ts.fidelity.checked)
    assert res.chosen.name in ("eager", "torchscript")
    m = load_bundle(res.bundle, trust_code=True)
    assert [b.code for b in m.manifest.control_flow] == [res.branches[0].code] and not m.manifest.specialized
    x = rare(np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32))
    np.testing.assert_allclose(m({"x": x})["output"], _eager(ref, x), rtol=1e-5, atol=1e-4)
    assert any("branches on its values" in n for n in res.notes)
    assert "branches on its values" in (tmp_path / "b" / "report" / "report.md").read_text()


@pytest.mark.slow
def test_allow_specialization_lets_traced_variants_compete_and_the_manifest_says_so(tmp_path):
    only_onnx = dict(runtimes=("onnxrt",), transforms=(), batch_sizes=(4,), seconds_per_size=0.02)
    refused = optimize("tests.models:RareRescale", OptimizeOptions(**only_onnx))
    assert refused.chosen is None and refused.variant("onnxrt").status == "skipped"
    res = optimize("tests.models:RareRescale", OptimizeOptions(**only_onnx, allow_specialization=True), out=tmp_path / "b")
    assert res.chosen.name == "onnxrt"
    m = load_bundle(res.bundle)
    assert m.manifest.specialized and m.manifest.control_flow[0].code == "while h.abs().max() > 1000:"
    assert any("SPECIALIZED" in n for n in m.manifest.notes)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32) * 1e4
    assert np.abs(m({"x": x})["output"] - _eager("tests.models:RareRescale", x)).max() > 100  # what consent means


@pytest.mark.slow
def test_a_model_without_control_flow_plans_the_same_variants():
    from torchship.plan import plan
    m = load_source("tests.models:ShapeBranch")
    from torchship.optimize import with_branches
    found = with_branches(m)
    assert found.branches == () and found.branches_unknown is None
    assert plan(found, transforms=("int8",)) == plan(m, transforms=("int8",))


def test_check_reports_the_places_with_the_fix():
    f = c.control_flow(load_source("tests.models:NegativeMean"))
    assert f.found and "if x.mean() < -1:" in f.evidence and "torch.cond" in f.fix and "--allow-specialization" in f.fix
    assert c.control_flow(load_source("tests.models:ShapeBranch")).status == "ok"


def test_a_model_whose_control_flow_cannot_be_looked_for_is_checked_on_pushed_values_too():
    from types import SimpleNamespace

    from torchship.spec import IOSpec
    from torchship.verify import extra_cases
    spec = IOSpec.parse(["x:float32[batch,8]"])
    plain = SimpleNamespace(spec=spec, dims={}, branches=())
    unknown = SimpleNamespace(spec=spec, dims={}, branches=(), branches_unknown="dynamo could not capture it")
    labels = lambda m, **kw: {label for label, _, _ in extra_cases(m, None, **kw)}  # noqa: E731
    pushed = {"values x10000", "values shifted -10", "values shifted +10"}
    assert not pushed & labels(plain) and pushed <= labels(unknown)
    assert not pushed & labels(unknown, branch_cases=False)  # --allow-specialization
