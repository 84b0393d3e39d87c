import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from torchship import OptimizeOptions, SourceError, TorchshipError, UsageError, load_source, optimize
from torchship.errors import MissingExtra  # noqa: F401  (part of the public error tree)


def test_module_attr_class_factory_and_example_inputs():
    m = load_source("tests.models:Tiny")  # inputs from the class's example_inputs
    assert str(m.spec) == "x:float32[batch,8] -> output:float32[batch,4]" and m.task == "classify"
    f = load_source("tests.models:tiny_factory", ["x:float32[batch,8]"])
    assert f.spec == m.spec and f.arch.ref == "tests.models:tiny_factory" and f.arch.imports == "tests.models"


def test_dict_outputs_and_two_inputs():
    m = load_source("tests.models:TwoHeads", ["x:float32[batch,8]", "y:float32[batch,5]"])
    assert m.spec.output_names == ["sum", "diff"] and m.task == "other"


@pytest.mark.parametrize("source, inputs, err, fragment", [
    ("tests.models:Nope", ["x:float32[batch,8]"], SourceError, "has no attribute"),
    ("no_such_pkg.mod:X", ["x:float32[batch,8]"], SourceError, "cannot import"),
    ("tests.models:NOT_A_MODEL", ["x:float32[batch,8]"], SourceError, "not an nn.Module"),
    ("tests.models:Broken", ["x:float32[batch,8]"], SourceError, "fails on an example input"),
    ("tests.models:Tiny", ["x:float32[batch,9]"], SourceError, "fails on an example input"),
    ("tests.models:Branchy", None, UsageError, "give the inputs"),
    ("zoo:nothing", None, SourceError, "zoo:digits-cnn"),
    ("missing.onnx", None, SourceError, "no such file"),
    ("what", None, SourceError, "not a source"),
])
def test_bad_sources_say_what_to_do(source, inputs, err, fragment):
    with pytest.raises(err, match=fragment):
        load_source(source, inputs)


def test_weights_from_safetensors_and_weights_only(tmp_path):
    trained = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.manual_seed(1)
    state = {f"net.{k}": torch.randn_like(v) for k, v in trained.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    x = torch.ones(2, 8)
    for path in ("w.safetensors", "w.pt"):
        m = load_source("tests.models:Tiny", weights=str(tmp_path / path))
        assert torch.equal(m.module.module.net[0].weight, state["net.0.weight"])
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a whole pickled module
    with pytest.raises(SourceError, match="weights_only=True"):
        load_source("tests.models:Tiny", weights=str(tmp_path / "pickled.pt"))
    with pytest.raises(SourceError, match="do not fit"):
        load_source("tests.models:Branchy", ["x:float32[batch,8]"], weights=str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError, match="--weights"):
        load_source(str(tmp_path / "w.pt"))
    del x


def test_files_that_are_not_what_their_names_say_are_one_clear_error(tmp_path, capsys):
    from torchship.cli import main
    for name in ("m.ts", "m.pt2", "m.onnx", "w.safetensors", "w.pt"):
        (tmp_path / name).write_bytes(b"these bytes are not a model")
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    cases = [  # (source, its inputs, weights, what the user reads, the exit code: 2 for a file refused as unsafe)
        ("m.ts", ["x:float32[batch,8]"], None, "is not a TorchScript file", 1),
        ("m.pt2", None, None, "is not a .pt2 archive", 2),
        ("m.onnx", None, None, "is not a readable ONNX model", 1),
        ("tests.models:Tiny", None, "missing.safetensors", "no such weights file", 1),
        ("tests.models:Tiny", None, "w.safetensors", "is not a readable safetensors file", 1),
        ("tests.models:Tiny", None, "w.pt", "cannot be loaded with weights_only=True", 1),
        ("tests.models:Tiny", None, "tensor.pt", "holds a Tensor, not a state dict", 1),
    ]
    for source, inputs, weights, fragment, code in cases:
        path = str(tmp_path / source) if "." in source and ":" not in source else source
        with pytest.raises(TorchshipError, match=fragment):
            load_source(path, inputs, weights=str(tmp_path / weights) if weights else None)
        args = ["optimize", path, "--out", str(tmp_path / "b")]
        args += [a for i in inputs or () for a in ("--input", i)] + (["--weights", str(tmp_path / weights)] if weights else [])
        assert main(args) == code
        err = capsys.readouterr().err
        assert fragment in " ".join(err.split()) and "Traceback" not in err, err
        assert not (tmp_path / "b").exists()


def test_torchscript_pt2_and_onnx_files(tmp_path):
    module = load_source("tests.models:Tiny").module
    x = torch.randn(3, 8)
    torch.jit.save(torch.jit.trace(module, (x,)), str(tmp_path / "m.ts"))
    ep = torch.export.export(module, (x,), dynamic_shapes=((({0: torch.export.Dim("batch")}),),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    with torch.inference_mode():
        want = module(x)[0].numpy()
    ts = load_source(str(tmp_path / "m.ts"), ["x:float32[batch,8]"])
    pt2 = load_source(str(tmp_path / "m.pt2"))
    assert pt2.spec.inputs[0].shape == ("batch", 8)
    for m in (ts, pt2):
        with torch.inference_mode():
            np.testing.assert_allclose(m.module(x)[0].numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="--input"):
        load_source(str(tmp_path / "m.ts"))


def test_onnx_source_runs_only_the_runtimes_that_read_onnx(tmp_path):
    from torchship.runtimes.onnxrt import export_onnx
    m = load_source("tests.models:Tiny")
    export_onnx(m, tmp_path / "tiny.onnx")
    res = optimize(str(tmp_path / "tiny.onnx"), OptimizeOptions(batch_sizes=(4,), seconds_per_size=0.05))
    assert {v.runtime for v in res.variants} == {"onnxrt", "openvino"}  # no torch runtime: there is no nn.Module
    assert res.chosen.fidelity.cosine > 0.9999
    assert res.variants[0].profile[4].throughput > 0


def test_integer_inputs_are_drawn_within_the_embedding_they_feed():
    m = load_source("tests.models:SmallVocab")
    assert m.spec.inputs[0].range == (0, 50)  # found under hooks: the ids go into a 50-row nn.Embedding
    res = optimize("tests.models:SmallVocab", OptimizeOptions(runtimes=("eager", "onnxrt"), batch_sizes=(2,),
                                                              seconds_per_size=0.02, transforms=()))
    assert res.chosen is not None and all(v.status == "ok" for v in res.variants if v.selectable)


def test_a_module_of_your_own_named_zoo(tmp_path, monkeypatch):
    (tmp_path / "zoo.py").write_text("from tests.models import Tiny as Net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SourceError, match="module:zoo:Net"):
        load_source("zoo:Net")
    assert load_source("module:zoo:Net").spec.input_names == ["x"]
    with pytest.raises(SourceError, match="no such file"):
        load_source("file:" + str(tmp_path / "missing.pt2"))


def test_a_model_handed_over_in_training_mode_is_said_so(tmp_path):
    res = optimize("tests.models:WithDropout", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(2,), seconds_per_size=0.02,
                                                               transforms=()), out=tmp_path / "b")
    assert res.notes and "training mode" in res.notes[0] and "eval mode" in res.notes[0]
    from torchship.bundle import read_manifest
    assert read_manifest(tmp_path / "b").notes == res.notes
    assert "training mode" in (res.report).read_text()


@pytest.mark.slow
def test_a_graph_that_specialized_on_its_example_is_rejected_with_the_reason():
    """A loop on a tensor's value: the ONNX export unrolls it as often as the example needed. Its cosine on the
    verification inputs was 0.99995; on other inputs it is wrong, and optimize says so and chooses a faithful one."""
    res = optimize("tests.models:ValueLoop", OptimizeOptions(runtimes=("eager", "torchscript", "onnxrt"), transforms=(),
                                                             batch_sizes=(4,), seconds_per_size=0.02,
                                                             allow_specialization=True))  # past the branch finder
    onnx = res.variant("onnxrt")
    assert onnx.status == "rejected" and ("off in scale" in onnx.reason or "did not cover" in onnx.reason)
    assert res.chosen.name in ("eager", "torchscript")
    assert {"batch 1", "values x2", "values negated"} <= set(res.chosen.fidelity.checked)
    assert "inputs beyond them (batch 1" in __import__("torchship.report", fromlist=["markdown"]).markdown(res)
