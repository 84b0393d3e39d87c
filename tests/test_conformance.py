"""Every registered runtime and every registered transform, held to what the rest of torchship expects of it.

A new runtime or transform is its own module and its tests: these are parametrized over the registries, so one that
cannot build, load and answer on a tiny model, or that lacks a fact the plan or the search reads, fails here, not in
a user's run."""
import dataclasses

import numpy as np
import pytest

from torchship.errors import BuildSkipped
from torchship.runtimes.base import DESCRIPTORS, BuildOptions, LoadContext, get, quantizer
from torchship.sources import load_source
from torchship import transforms
from torchship.transforms import GAINS, REGISTRY, apply, from_dict, to_dict

RUNS = [(r, BuildOptions()) for r in DESCRIPTORS] + [
    (r, BuildOptions(quantize=q.quantize)) for r, d in DESCRIPTORS.items() for q in d.quantizes]


@pytest.fixture(scope="module")
def tiny():
    import torch
    from dataclasses import replace
    rng = np.random.default_rng(0)
    model = load_source("tests.models:Tiny")
    model = replace(model, calibration_data={"x": rng.standard_normal((64, 8)).astype(np.float32)})  # static int8's
    x = rng.standard_normal((5, 8)).astype(np.float32)
    with torch.inference_mode():
        want = model.module(torch.from_numpy(x))[0].numpy()
    return model, x, want


@pytest.fixture(scope="module")
def outlier():
    """An MLP and data with an outlier in its first input (``tests.models.Outlier``): plain int8 misses the default
    budget there, so int8 with accuracy control has to leave the first layer in float: its search runs, not only its
    first quantization."""
    import torch
    from dataclasses import replace

    from tests.models import outlier_data
    model = replace(load_source("tests.models:Outlier"), calibration_data=outlier_data(64))
    x = outlier_data(32, seed=1)["x"]
    with torch.inference_mode():
        want = model.module(torch.from_numpy(x))[0].numpy()
    return model, x, want


def _keeps_floors(runtime: str, options: BuildOptions) -> bool:
    own = quantizer(runtime, options.quantize)
    return own is not None and own.keeps_floors


@pytest.mark.parametrize("runtime,options", RUNS, ids=[f"{r}{'+' + o.quantize if o.quantize else ''}" for r, o in RUNS])
def test_each_runtime_builds_loads_and_answers_like_the_model(runtime, options, tiny, outlier, tmp_path):
    model, x, want = outlier if _keeps_floors(runtime, options) else tiny
    try:
        artifact = get(runtime).build(model, options, tmp_path)
    except BuildSkipped as exc:  # allowed only with a reason a user can act on
        assert len(str(exc)) > 20, exc
        pytest.skip(f"{runtime} skipped its build: {exc}")
    assert artifact.runtime == runtime and artifact.files and all((tmp_path / f).exists() for f in artifact.files)
    assert artifact.options.quantize == options.quantize  # what it was built with travels to its load
    got = get(runtime).load(artifact, tmp_path, model.spec, LoadContext(threads=1, trust_code=True))({"x": x})["output"]
    assert got.shape == want.shape and got.dtype == np.float32
    cos = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
    if _keeps_floors(runtime, options):  # the default budget's floor (0.999) held, where plain int8 misses it
        assert 0.999 <= cos < 1 - 1e-9 and artifact.options.layout, (runtime, options.quantize, cos)
    elif options.quantize:  # int8 on an 8-16-4 MLP: near, not faithful (the budget judges that, in the search)
        assert cos > 0.95, (runtime, options.quantize, cos)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", list(REGISTRY))
def test_each_transform_has_its_facts_applies_and_round_trips(kind, tiny):
    config_type = REGISTRY[kind].config
    assert dataclasses.is_dataclass(config_type) and config_type.__dataclass_params__.frozen
    config = config_type()
    assert from_dict(to_dict(config)) == config and to_dict(config)["kind"] == kind
    from torchship.plan import transform_words
    assert config.family in transform_words()  # a --transforms word turns it on
    assert config.covers in ("linear", "all") and set(config.devices) <= {"cpu", "cuda"}
    offers = config_type.offers()
    assert offers or config.family in ("qat", "channels", "distill")  # planned, or a trained variant's step
    if offers:  # what the plan builds with it: the search can bound its gain, on runtimes that exist
        assert config.family in GAINS
        assert all(o.runtime in DESCRIPTORS and isinstance(o.config, config_type) for o in offers)
    model, x, want = tiny
    import torch
    example = (torch.from_numpy(x),)
    try:
        changed = apply(model.module, config, example)
    except BuildSkipped as exc:
        pytest.skip(f"{kind}: {exc}")
    assert changed is not model.module  # a new module; the given one untouched
    with torch.inference_mode():
        np.testing.assert_array_equal(model.module(*example)[0].numpy(), want)
        out = changed(*example)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert out.shape[0] == 5 and torch.isfinite(out).all()


def test_a_transform_without_example_inputs_that_needs_them_says_so(tiny):
    from torchship.errors import UsageError
    needs = [r.config for r in REGISTRY.values() if r.config.needs_example]
    assert needs  # channel pruning traces the model
    with pytest.raises(UsageError, match="pass example inputs"):
        apply(tiny[0].module, needs[0]())


def test_a_registered_transform_is_planned_with_no_other_change(tiny):
    """Registering a config with its offers is all the plan, the search and the CLI need: a new technique of a new
    family is a --transforms word, its gain bound is known, and it appears in the plan's variants."""
    from torchship.optimize.search import max_gain
    from torchship.plan import plan, transform_words

    @dataclasses.dataclass(frozen=True)
    class Halve:
        kind: str = "test_halve"
        at_load: bool = False
        family = "halve"
        covers = "all"
        needs_example = False
        devices = ("cpu",)
        gain = (1.5, None, 1.5)

        @classmethod
        def offers(cls):
            return (transforms.Offer("eager", "halve", cls(), "weights halved"),)

    transforms.register(Halve)(lambda module, config, context: module)
    try:
        assert "halve" in transform_words() and max_gain("halve", frozenset()) == 1.5
        by = {v.name: v for v in plan(tiny[0], runtimes=["eager"], transforms=("halve",))}
        assert by["eager+halve"].transforms == ({"kind": "test_halve", "at_load": False},)
        assert by["eager+halve"].parent == "eager" and by["eager+halve"].note == "weights halved"
    finally:
        del transforms.REGISTRY["test_halve"], transforms.KINDS["test_halve"], transforms.GAINS["halve"]
