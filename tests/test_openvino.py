"""OpenVINO: IR converted from the exported program, verified like every variant, bundled with both files checked,
loaded with the thread count asked for, served; bf16/f16 only where the CPU plugin runs them natively; NNCF int8."""
import numpy as np
import pytest

import openvino  # noqa: E402,F401  (the dev install has it: a broken install fails, never skips)

from torchship import Budget, OptimizeOptions, load_bundle, optimize  # noqa: E402
from torchship.zoo.digits import dataset  # noqa: E402


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "b"
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("openvino",), batch_sizes=(1, 8), seconds_per_size=0.05,
                                                     transforms=()), out=out)
    return res, out


def test_an_openvino_variant_verifies_and_its_bundle_answers(ov_bundle):
    res, out = ov_bundle
    v = res.variant("openvino")
    assert v.status == "ok" and v.fidelity.cosine > 0.9999 and v.artifact.options.converted_from == "the torch.export program"
    loaded = load_bundle(out, threads=1)  # IR is data: no consent needed
    assert set(loaded.manifest.files) >= {"model.xml", "model.bin"} and loaded.manifest.executes is None
    assert loaded.runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert "float32" in str(loaded.runner.compiled.get_property("INFERENCE_PRECISION_HINT"))  # not the CPU's bf16 default
    x, y = dataset()["test"]
    for n in (1, 5, 64):  # batch sizes other than timed: the batch dimension is dynamic in the IR
        logits = loaded({"image": x[:n]})["logits"]
        assert logits.shape == (n, 10)
    assert (loaded({"image": x[:64]})["logits"].argmax(1) == y[:64]).mean() >= 0.95


def test_bf16_and_f16_only_where_the_plugin_runs_them(monkeypatch):
    import torchship.runtimes.openvino as ov
    from torchship.plan import plan
    from torchship.sources import load_source
    model = load_source("tests.models:Tiny")
    monkeypatch.setattr(ov, "capabilities", lambda: ("FP32", "INT8"))
    by = {v.name: v for v in plan(model, "cpu", ["openvino"], None, ("bf16",))}
    assert "no native BF16" in by["openvino-bf16"].skip and "no native FP16" in by["openvino-f16"].skip
    monkeypatch.setattr(ov, "capabilities", lambda: ("FP32", "BF16", "FP16"))
    by = {v.name: v for v in plan(model, "cpu", ["openvino"], None, ("bf16",))}
    assert by["openvino-bf16"].skip is None and by["openvino-f16"].skip is None


def test_an_onnx_source_runs_on_openvino_too(tmp_path):
    from torchship.runtimes.onnxrt import export_onnx
    from torchship.sources import load_source
    export_onnx(load_source("tests.models:Tiny"), tmp_path / "tiny.onnx")
    res = optimize(str(tmp_path / "tiny.onnx"), OptimizeOptions(runtimes=("onnxrt", "openvino"), batch_sizes=(4,),
                                                                seconds_per_size=0.02, transforms=()))
    v = res.variant("openvino")
    assert v.status == "ok" and v.artifact.options.converted_from == "the ONNX file"


@pytest.mark.slow
def test_nncf_int8_is_calibrated_and_held_to_the_budget(tmp_path):
    x, y = dataset()["test"]
    np.savez(tmp_path / "eval.npz", image=x[:200], labels=y[:200])
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("openvino",), transforms=("int8",), batch_sizes=(16,),
                                                     seconds_per_size=0.05, budget=Budget.parse("accuracy_drop=0.01"),
                                                     exhaustive=True), eval_data=tmp_path / "eval.npz")
    v = res.variant("openvino+int8")
    assert v.status == "ok", v.reason
    assert v.fidelity.accuracy >= v.fidelity.reference_accuracy - 0.01 and v.fidelity.max_abs_error > 0  # really int8
    assert any("reported, not judged: calibrated ranges" in c for c in v.fidelity.checked)


@pytest.mark.slow
def test_an_openvino_bundle_serves(server, ov_bundle):
    import tritonclient.http as triton
    _, out = ov_bundle
    s = server(out)
    client = triton.InferenceServerClient(s.url)
    x = dataset()["test"][0][:3]
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    got = client.infer("digits-cnn", [inp]).as_numpy("logits")
    np.testing.assert_allclose(got, load_bundle(out)({"image": x})["logits"], rtol=1e-5, atol=1e-5)
