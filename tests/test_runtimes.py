"""Every runtime describes itself once (``runtimes.base.DESCRIPTORS``) and the plan, the choice, the bundle, the
control-flow rule and the CLI read that: a runtime missing a fact fails here, not in a user's run."""
import importlib.util
import re

import pytest

from torchship import plan, select
from torchship.errors import MissingExtra, UsageError
from torchship.flow import SPECIALIZING
from torchship.runtimes.base import DESCRIPTORS, MODULES, Descriptor, describe, get


@pytest.mark.parametrize("name", MODULES)
def test_each_runtime_has_a_module_that_registers_it_and_a_descriptor(name):
    d = describe(name)
    assert d.name == name and d.what and d.takes and set(d.takes) <= {"module", "onnx", "program"}
    assert importlib.util.find_spec(f"torchship.runtimes.{name}") is not None  # its own module
    try:
        assert get(name).name == name  # registered under its name
    except MissingExtra as exc:  # its packages are an extra the machine lacks: the error names it
        assert exc.extra == d.extra


def test_every_reader_takes_its_facts_from_the_descriptors():
    assert plan.RUNTIME_ORDER == MODULES
    assert select.SIMPLICITY == tuple(sorted(MODULES, key=lambda r: DESCRIPTORS[r].simplicity))
    assert set(select.WHAT) == set(MODULES) and len({d.simplicity for d in DESCRIPTORS.values()}) == len(MODULES)
    assert set(SPECIALIZING) == {r for r, d in DESCRIPTORS.items() if d.specializes}
    from torchship.bundle import executes
    from torchship.runtimes.base import Artifact
    natives = {r for r, d in DESCRIPTORS.items() if d.native}
    assert {r for r in MODULES if executes(Artifact(r, ("x",)))} == natives
    from torchship.errors import EXTRAS
    assert all(d.extra in EXTRAS for d in DESCRIPTORS.values())


def test_the_cli_lists_every_runtime():
    from typer.testing import CliRunner

    from torchship.cli import app
    text = " ".join(CliRunner().invoke(app, ["optimize", "--help"], terminal_width=200).output.split())
    listed = re.search(r"comma-separated subset of ([a-z,\s]+)", text).group(1).replace(" ", "").strip(",").split(",")
    assert listed[:len(MODULES)] == list(MODULES)


def test_an_unknown_runtime_names_the_known_ones():
    with pytest.raises(UsageError, match="registered runtimes: eager, torchscript"):
        describe("tensorrt")
    with pytest.raises(TypeError):
        Descriptor("x")  # what and simplicity are required: a runtime cannot leave them out


def test_the_plan_names_each_variants_parent():
    """Lineage comes from the plan (VariantPlan.parent), not from parsing a variant's name where it is used."""
    from torchship.plan import plan
    from torchship.sources import load_source
    by = {v.name: v for v in plan(load_source("tests.models:Tiny"), transforms=("int8", "bf16", "prune"),
                                  runtimes=["eager", "onnxrt", "compile"])}
    assert by["eager"].parent == by["onnxrt"].parent == by["eager-naive"].parent == "model"
    assert by["onnxrt+int8"].parent == "onnxrt" and by["eager+prune30"].parent == "eager"
    assert by["compile+ao-int8"].parent == "compile"
    assert all(v.parent is not None for v in by.values())


@pytest.mark.slow
def test_static_int8_with_accuracy_control_leaves_the_costly_nodes_in_fp32(tmp_path):
    """ONNX Runtime's static int8 with accuracy control (``control``): on an MLP with an activation outlier, static
    int8 misses the budget; the mixed variant keeps in fp32 the nodes whose int8 costs it, holds the budget, says
    which in its row, and its bundle really runs int8 on the rest. Where static int8 holds by itself, the mixed one
    would be the same model: a skipped row that says so."""
    import numpy as np

    from tests.models import outlier_data
    from torchship.optimize import OptimizeOptions, optimize
    opts = OptimizeOptions(runtimes=("onnxrt",), transforms=("int8",), batch_sizes=(16,), seconds_per_size=0.05,
                           exhaustive=True, cache=False)
    np.savez(tmp_path / "eval.npz", **outlier_data(256))  # an outlier in the first input: the first layer's alone
    res = optimize("tests.models:Outlier", opts, out=tmp_path / "bundle", eval_data=tmp_path / "eval.npz")
    static, mixed = res.variant("onnxrt+static-int8"), res.variant("onnxrt+static-int8-mixed")
    assert static.status == "rejected" and static.fidelity.cosine < 0.99, static.reason
    assert mixed.status == "ok" and mixed.fidelity.cosine >= 0.999, mixed.reason
    layout = mixed.artifact.options.layout
    assert layout.startswith("int8 on 2 of the 3 nodes it reaches; in fp32, costliest first: "), layout
    report = (tmp_path / "bundle" / "report" / "report.md").read_text()
    assert "int8 on 2 of the 3 nodes" in report
    assert mixed.fidelity.max_abs_error > 0  # really int8 on the rest
    tiny = optimize("tests.models:Tiny", opts)
    # static int8 holds on Tiny at batch 1 too, judged there against its own error on the same item (it was rejected
    # for one random item's 0.134 against the whole pool's 0.011)
    assert tiny.variant("onnxrt+static-int8").status == "ok", tiny.variant("onnxrt+static-int8").reason
    assert tiny.variant("onnxrt+static-int8-mixed").status == "skipped"
    assert "keeps the floors by itself" in tiny.variant("onnxrt+static-int8-mixed").reason


@pytest.mark.slow
def test_dynamic_int8_with_accuracy_control_leaves_the_costly_linear_layers_in_fp32(tmp_path):
    """torch.ao dynamic int8 with accuracy control (eager's own ``int8-mixed``): on the MLP with an activation outlier,
    int8 on every Linear layer misses the budget (the outlier sets the first layer's activation scale); the mixed
    variant keeps that layer alone in fp32, holds the budget and says so in its row; what loads keeps that layer in
    fp32 and runs the others as dynamic int8. Where dynamic int8 holds by itself: a skipped row."""
    import json
    from dataclasses import replace

    import msgspec
    import numpy as np
    import torch

    from tests.models import outlier_data
    from torchship.optimize import OptimizeOptions, optimize
    from torchship.runtimes.base import BuildOptions, LoadContext
    from torchship.sources import load_source
    from torchship.transforms import from_dict
    opts = OptimizeOptions(runtimes=("eager",), transforms=("int8",), batch_sizes=(16,), seconds_per_size=0.05,
                           exhaustive=True, cache=False)
    np.savez(tmp_path / "eval.npz", **outlier_data(256))
    res = optimize("tests.models:Outlier", opts, out=tmp_path / "bundle", eval_data=tmp_path / "eval.npz")
    plain, mixed = res.variant("eager+int8"), res.variant("eager+int8-mixed")
    assert plain.status == "rejected" and plain.fidelity.cosine < 0.99, plain.reason
    assert mixed.status == "ok" and mixed.fidelity.cosine >= 0.999, mixed.reason
    layout = mixed.artifact.options.layout
    assert re.match(r"int8 on 2 of the 3 Linear layers; in fp32, costliest first: (\w+\.)*a \(cosine 0\.99", layout), layout
    assert "int8 on 2 of the 3 Linear layers" in (tmp_path / "bundle" / "report" / "report.md").read_text()
    assert mixed.fidelity.max_abs_error > 0  # really int8 on the rest
    # what a bundle of it loads: the layout, as its manifest records it (JSON), applied again to the fp32 weights
    model = replace(load_source("tests.models:Outlier"), calibration_data=outlier_data(64))
    artifact = get("eager").build(model, BuildOptions(quantize="dynamic_int8_mixed", floors={"cosine": 0.999}), tmp_path)
    (recorded,) = artifact.options.transforms
    artifact = msgspec.structs.replace(artifact, options=artifact.options.found(transforms=(json.loads(json.dumps(recorded)),)))
    (kept_float,) = from_dict(artifact.options.transforms[0]).float_layers
    assert kept_float.endswith(layout.split(": ")[1].split(" ")[0]) and kept_float.rsplit(".", 1)[-1] == "a"
    loaded = get("eager").load(artifact, tmp_path, model.spec, LoadContext(threads=1, trust_code=True))
    linears = {n: type(m) for n, m in loaded.fn.named_modules() if type(m).__name__ == "Linear"}
    assert sorted(n.rsplit(".", 1)[-1] for n, t in linears.items() if t is torch.nn.Linear) == ["a"], linears
    assert sum(t is torch.ao.nn.quantized.dynamic.Linear for t in linears.values()) == 2, linears
    tiny = optimize("tests.models:Tiny", opts)
    assert tiny.variant("eager+int8-mixed").status == "skipped"
    assert "keeps the floors by itself" in tiny.variant("eager+int8-mixed").reason


@pytest.mark.slow
def test_compile_marks_the_named_dimensions_dynamic_so_new_sizes_compile_nothing(tmp_path):
    """A compile bundle takes every batch size and length after two compiles (the sizes, and a batch of one, which
    torch specializes), not one more for each dimension that turns out to vary: a server's first requests of new
    sizes stall on no compile, and the search's worker compiles half as often (benchmarks/compile_shapes.py)."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from torchship.runtimes.base import BuildOptions, LoadContext
    from torchship.sources import load_source
    model = load_source("tests.models:SmallVocab")
    artifact = get("compile").build(model, BuildOptions(), tmp_path)
    run = get("compile").load(artifact, tmp_path, model.spec, LoadContext(threads=1, trust_code=True))
    torch._dynamo.reset()
    counters.clear()
    rng = np.random.default_rng(0)
    for batch, seq in [(2, 5), (4, 9), (1, 3), (3, 7), (1, 6), (8, 2)]:
        ids = rng.integers(0, 50, (batch, seq))
        got = run({"ids": ids})["output"]
        with torch.inference_mode():
            np.testing.assert_allclose(got, model.module(torch.from_numpy(ids))[0].numpy(), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2


def test_int8_with_accuracy_control_on_eager_and_onnxrt_is_a_skipped_row_for_a_transformer(tmp_path):
    """A transformer's raw text needs most operations in float under their one-at-a-time search (measured on MiniLM):
    for a model with attention the two are skipped rows that send the user to OpenVINO's int8-mixed; for an MLP they
    are planned with the budget's floors."""
    from tests._text import bert_dir
    from torchship.plan import plan
    from torchship.sources import load_source
    floors = {"cosine": 0.999}
    mixed = ("eager+int8-mixed", "onnxrt+static-int8-mixed")
    bert = {v.name: v for v in plan(load_source(str(bert_dir(tmp_path / "bert"))), "cpu", ["eager", "onnxrt"], None,
                                    ("int8",), floors=floors)}
    assert all("OpenVINO's int8-mixed is built for" in bert[name].skip for name in mixed)
    mlp = {v.name: v for v in plan(load_source("tests.models:Outlier"), "cpu", ["eager", "onnxrt"], None, ("int8",),
                                   floors=floors)}
    assert all(mlp[name].skip is None and mlp[name].options.floors == floors for name in mixed)
