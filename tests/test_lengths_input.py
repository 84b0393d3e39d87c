"""Inputs whose values are bounded by another input's dimension (issue 34): a packed-sequence GRU and LSTM that take
each sequence's length, written `lengths:int64[batch]{1:seq+1}`, optimize and serve with eager's answers; every
stage draws lengths within the sequence it has at that moment, and a served length past its sequence is a 400."""
import numpy as np
import pytest
import torch

from torchship import OptimizeOptions, SpecError, load_bundle, load_source, optimize
from torchship.spec import IOSpec

SPEC = IOSpec.parse(["x:float32[batch,seq,16]", "lengths:int64[batch]{1:seq+1}"])


def test_a_range_that_follows_a_dimension_is_written_drawn_and_checked():
    assert str(SPEC.inputs[1]) == "lengths:int64[batch]{1:seq+1}"
    for seq in (1, 3, 14, 20):
        feeds = SPEC.sample(5, {"seq": seq}, seed=seq)
        lengths = feeds["lengths"]
        assert lengths.min() >= 1 and lengths.max() <= seq
        for row, n in zip(feeds["x"], lengths):  # past its length, a row is padding
            assert not row[n:].any()
        assert SPEC.check(feeds) == 5
    bad = {**SPEC.sample(2, {"seq": 6}), "lengths": np.array([3, 7])}
    with pytest.raises(SpecError, match=r"values must lie in \[1, seq\+1\) = \[1, 7\) here \(seq is 6\), got 3 to 7"):
        SPEC.check(bad)
    with pytest.raises(SpecError, match="follows dimension 'steps', which no input has"):
        IOSpec.parse(["x:float32[batch,seq]", "n:int64[batch]{0:steps}"])
    assert IOSpec.parse(["n:int64[batch,seq]{0:seq-1}"]).inputs[0].range == (0, "seq-1")


def test_lengths_given_without_their_bound_get_one_line_that_says_what_to_do():
    from torchship import SourceError
    with pytest.raises(SourceError) as info:  # lengths drawn up to 20 while seq is shorter: torch's RNN fails
        load_source("tests.models:PackedGru", ["x:float32[batch,seq,16]", "lengths:int64[batch]{1:21}"], dims={"seq": 20})
    text = str(info.value)
    assert "the model fails when run at batch=" in text and "seq=" in text and "lengths:int64[batch]{1:seq+1}" in text


def _eager(ref, feeds):
    m = load_source(ref)
    with torch.inference_mode():
        return m.module(*[torch.from_numpy(feeds[n]) for n in m.spec.input_names])[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["tests.models:PackedGru", "tests.models:PackedLstm"])
def test_packed_recurrent_models_optimize_and_answer_like_eager(ref, tmp_path):
    res = optimize(ref, OptimizeOptions(runtimes=("eager", "torchscript", "onnxrt"), transforms=(), batch_sizes=(1, 4),
                                        seconds_per_size=0.02), dims={"seq": 20}, out=tmp_path / "b")
    assert res.chosen is not None, res.message
    for v in res.variants:
        assert v.status in ("ok", "skipped", "rejected"), (v.name, v.reason)
    m = load_bundle(res.bundle, trust_code=True)
    for seq in (1, 7, 20, 33):
        feeds = SPEC.sample(3, {"seq": seq}, seed=seq)
        np.testing.assert_allclose(m(feeds)["output"], _eager(ref, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_packed_gru_optimizes_from_the_cli(tmp_path):
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "torchship.cli", "optimize", "tests.models:PackedGru",
                          "--input", "x:float32[batch,seq,16]", "--input", "lengths:int64[batch]{1:seq+1}",
                          "--dim", "seq=20", "--runtimes", "eager,torchscript", "--transforms", "none",
                          "--batch-sizes", "1,4", "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    m = load_bundle(tmp_path / "b", trust_code=True)
    assert str(m.spec.inputs[1]) == "lengths:int64[batch]{1:seq+1}"  # the bound travels in the manifest
    feeds = SPEC.sample(4, {"seq": 9}, seed=3)
    np.testing.assert_allclose(m(feeds)["output"], _eager("tests.models:PackedGru", feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_served_length_past_its_sequence_is_a_400(server, tmp_path):
    out = tmp_path / "gru"
    optimize("tests.models:PackedGru", OptimizeOptions(runtimes=("eager",), transforms=(), batch_sizes=(1,),
                                                      seconds_per_size=0.02), dims={"seq": 8}, out=out, name="gru")
    s = server(out, "--trust-code")
    x = np.zeros((2, 5, 16), np.float32).reshape(-1).tolist()  # zeros: the GRU's answer still depends on each length
    body = lambda lengths: {"inputs": [  # noqa: E731
        {"name": "x", "shape": [2, 5, 16], "datatype": "FP32", "data": x},
        {"name": "lengths", "shape": [2], "datatype": "INT64", "data": lengths}]}
    r = s.http("POST", "/v2/models/gru/infer", json=body([3, 6]))
    assert r.status_code == 400 and "lengths" in r.json()["error"] and "seq is 5" in r.json()["error"]
    ok = s.http("POST", "/v2/models/gru/infer", json=body([3, 5]))
    assert ok.status_code == 200
    out = ok.json()["outputs"][0]
    want = _eager("tests.models:PackedGru", {"x": np.zeros((2, 5, 16), np.float32), "lengths": np.array([3, 5])})
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, rtol=1e-4, atol=1e-5)
