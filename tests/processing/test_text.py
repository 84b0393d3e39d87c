"""Text in, answers out: a bundle carries its tokenizer (tokenizer.json) and the pooling inside its graph, is checked
end to end against the original library's pipeline when it is built, and takes a list of strings from Python."""
import json

import msgspec
import numpy as np
import pytest

from tests._text import bert_dir, sentence_transformers_dir
from torchship import BundleError, OptimizeOptions, load_bundle, optimize
from torchship.processing.build import LONG_TEXT
from torchship.processing.text import TextPipeline
from torchship.errors import SpecError

pytestmark = pytest.mark.slow


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_a_sentence_transformers_directory_becomes_a_bundle_that_takes_text(st_dir, st_bundle):
    from sentence_transformers import SentenceTransformer
    m = load_bundle(st_bundle)
    p = m.manifest.processing
    assert p.text.tokenizer in m.manifest.files and p.text.output == "embedding"
    assert p.text.max_length == 40  # sentence-transformers' max_seq_length, saved as the tokenizer's length
    check = p.check
    assert check.passed and check.inputs_equal and check.min_cosine >= 0.9999
    assert check.reference.startswith("sentence-transformers")
    assert {"empty", "emoji", "cjk", "longer than the model takes", "mixed lengths in one batch"} <= set(check.cases)
    texts = ["the quick brown fox", "", "  ", "naïve café 🚀", "日本語", LONG_TEXT, "hello world"]
    want = SentenceTransformer(str(st_dir), device="cpu").encode(texts)
    got = m(texts)["embedding"]
    assert got.shape == want.shape and cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(m("hello world")["embedding"][0], got[-1], atol=1e-5)  # one string alone: one item
    report = (st_bundle / "report" / "report.md").read_text()
    assert "Raw input and answers" in report and "sentence-transformers" in report


def test_without_normalize_the_embedding_is_not_normalized(tmp_path):
    from sentence_transformers import SentenceTransformer
    d = sentence_transformers_dir(tmp_path / "raw", normalize=False)
    out = optimize(d, OptimizeOptions(runtimes=("eager",), transforms=(), batch_sizes=(1,), seconds_per_size=0.02),
                   out=tmp_path / "b").bundle
    got = load_bundle(out)(["a quick dog", "the river at night"])["embedding"]
    want = SentenceTransformer(str(d), device="cpu").encode(["a quick dog", "the river at night"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_a_plain_hf_directory_takes_text_checked_against_transformers(tmp_path):
    d = bert_dir(tmp_path / "bert")
    result = optimize(d, OptimizeOptions(runtimes=("eager",), transforms=(), batch_sizes=(1,), seconds_per_size=0.02),
                      out=tmp_path / "b")
    p = load_bundle(result.bundle).manifest.processing
    assert p.check.passed and "transformers tokenizer" in p.check.reference and p.text.output is None
    out = load_bundle(result.bundle)(["hello world", "a"])
    assert out["last_hidden_state"].shape[:2] == (2, 4)  # padded to the longest: [CLS] hello world [SEP]


def test_no_processing_and_a_model_without_a_tokenizer_take_tensors_only(st_dir, tmp_path):
    opts = OptimizeOptions(runtimes=("eager",), transforms=(), batch_sizes=(1,), seconds_per_size=0.02, processing=False)
    m = load_bundle(optimize(st_dir, opts, out=tmp_path / "b").bundle)
    assert m.manifest.processing is None and "tokenizer.json" not in m.manifest.files
    with pytest.raises(Exception, match="has no processing"):
        m(["hello"])


def test_a_changed_tokenizer_fails_its_checksum(st_bundle, tmp_path):
    import shutil
    copy = tmp_path / "b"
    shutil.copytree(st_bundle, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"]["hello"], tok["model"]["vocab"]["world"] = tok["model"]["vocab"]["world"], tok["model"]["vocab"]["hello"]
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(BundleError, match="tokenizer.json fails its checksum"):
        load_bundle(copy)


def test_the_pipeline_truncates_or_refuses_and_checks_token_arrays(st_bundle):
    record = load_bundle(st_bundle).manifest.processing.text
    cut = TextPipeline(record, st_bundle)
    feeds = cut.encode([LONG_TEXT, "hello"])
    assert feeds["input_ids"].shape == (2, record.max_length) and feeds["attention_mask"][1].sum() == 3
    import msgspec
    strict = TextPipeline(msgspec.structs.replace(record, truncate=False), st_bundle)
    with pytest.raises(SpecError, match="item 0 has .* tokens, over the 40"):
        strict.encode([LONG_TEXT])
    with pytest.raises(SpecError, match="no text given"):
        cut.encode([])
    with pytest.raises(SpecError, match=r"ids must lie in \[0, "):
        cut.from_ids([[2, 10_000, 3]])
    ids = cut.from_ids([[2, 5, 3], [2, 3]])
    assert ids["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]] and ids["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_a_manifest_that_lists_no_checksum_for_its_tokenizer_is_refused(st_bundle, tmp_path):
    import shutil
    copy = tmp_path / "b"
    shutil.copytree(st_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["files"]["tokenizer.json"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="tokenizer.json"):
        load_bundle(copy)


def test_a_tokenizer_given_apart_from_the_source_from_the_cli(tmp_path, capsys):
    import shutil
    from torchship.cli import main
    d = bert_dir(tmp_path / "bert")
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in d.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.move(str(f), tok / f.name)
    args = ["optimize", str(d), "--runtimes", "eager", "--transforms", "none", "--batch-sizes", "1", "--out"]
    assert main(args + [str(tmp_path / "b0")]) == 0
    assert load_bundle(tmp_path / "b0").manifest.processing is None
    assert main(args + [str(tmp_path / "b"), "--tokenizer", str(tok)]) == 0, capsys.readouterr().err[-2000:]
    m = load_bundle(tmp_path / "b")
    assert m.manifest.processing.check.passed and m(["hello world"])["last_hidden_state"].shape[:2] == (1, 4)
    capsys.readouterr()
    assert main(args + [str(tmp_path / "b1"), "--tokenizer", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--tokenizer" in err and "none of tokenizer.json" in err


def test_a_variant_that_falls_short_on_raw_text_is_rejected_and_the_next_one_is_packaged(st_dir, tmp_path, monkeypatch):
    """Whichever variant is chosen first (timing decides that, and nothing here depends on it) gets answers that miss
    the floor on raw text while the pipeline is right: it is rejected with the reason, the next choice is checked for
    real and packaged with the text pipeline, and the report and notes say so. Both checks take the search's raw
    cases: the original library's pipeline runs once in all."""
    import importlib

    from torchship.processing import build
    raw = importlib.import_module("torchship.optimize.raw")  # (torchship.optimize is also the function)
    real, first, made = raw._check, [], []
    monkeypatch.setattr(build, "text_cases", lambda *a, real=build.text_cases: made.append(1) or real(*a))

    def check(c, result, model, processing, kind, root, known):
        found, why = real(c, result, model, processing, kind, root, known)
        if first and c.name != first[0]:
            return found, why
        first.append(c.name)
        short = msgspec.structs.replace(found, min_cosine=0.93, passed=False)
        assert short.variant_fault  # the same tokens, and the source model agrees with sentence-transformers
        return short, "an item reached cosine 0.930000 < 0.9999 against sentence-transformers"
    monkeypatch.setattr(raw, "_check", check)
    opts = OptimizeOptions(runtimes=("eager", "onnxrt"), transforms=(), batch_sizes=(1,), seconds_per_size=0.02)
    result = optimize(st_dir, opts, out=tmp_path / "b")
    loser = result.variant(first[0])
    assert result.chosen.name != first[0] and result.chosen.ok
    assert loser.status == "rejected" and loser.reason.startswith("raw input: an item reached cosine 0.930000")
    assert any(n.startswith(f"{first[0]}: rejected, its answers on raw text fell short") for n in result.notes)
    assert len(made) == 1
    m = load_bundle(result.bundle)
    assert m.manifest.processing.check.passed and m.manifest.processing.check.source_min_cosine >= 0.9999
    assert m(["hello world"])["embedding"].shape == (1, 32)


def test_a_variant_off_on_raw_text_is_rejected_in_the_search_with_its_worst_item(st_dir, tmp_path, monkeypatch):
    """Every candidate runs raw text through the bundle's pipeline as it is verified: one whose answers on the short
    items are off (as int8's were on MiniLM) is rejected there, before the choice, with the worst item's cosine and
    the floor it missed; the others carry theirs, and the choice needs no second try after the search."""
    from torchship.optimize import job
    real, ran = job.Variant._raw, []

    def raw(self, workdir):
        path, error = real(self, workdir)
        if self.job.raw:
            ran.append(self.job.variant.name)
        if self.job.variant.name == "onnxrt":
            with np.load(path) as z:
                outs = {k: z[k] for k in z.files}
            short = job._arrays(self.job.raw)["attention_mask"].sum(1) <= 3
            outs["embedding"][short] += 0.5 * np.linalg.norm(outs["embedding"][short], axis=1, keepdims=True)
            np.savez(path, **outs)
        return path, error
    monkeypatch.setattr(job.Variant, "_raw", raw)
    opts = OptimizeOptions(runtimes=("eager", "onnxrt"), transforms=(), batch_sizes=(1,), seconds_per_size=0.02,
                           isolate=False, cache=False)
    result = optimize(st_dir, opts, out=tmp_path / "b")
    off, eager = result.variant("onnxrt"), result.variant("eager")
    assert off.status == "rejected" and off.reason.startswith("raw input: an item reached cosine"), off.reason
    assert off.fidelity.raw_cosine < 0.99 and off.fidelity.raw_floor == 0.9999
    assert eager.ok and eager.fidelity.raw_cosine >= 0.9999 and result.chosen.name == "eager"
    assert not any("fell short" in n for n in result.notes)  # settled in the search
    assert sorted(ran) == ["eager", "onnxrt"]  # the candidates; not the reference row (eager-naive), never chosen
    assert load_bundle(result.bundle).manifest.processing.check.passed
    assert "Raw input" in (result.bundle / "report" / "report.md").read_text()


def test_the_source_model_through_the_pipeline_tells_the_pipeline_s_fault_from_the_variant_s(st_dir):
    """A runner whose answers on the short items (empty, whitespace) are off, as int8's were: the check fails, the tokens
    are the same, and the source model in eager fp32 through the same tokens agrees with sentence-transformers, so
    it is the variant's fault. A pipeline that pools otherwise than sentence-transformers is not."""
    from torchship.processing.build import check_text, text_processing
    from torchship.sources import load_source
    model = load_source(str(st_dir))
    processing, _ = text_processing(model, st_dir.parent / "check")
    folder = st_dir.parent / "check"

    def eager(feeds):
        import torch
        with torch.inference_mode():
            return {"embedding": model.module(*[torch.from_numpy(feeds[n]) for n in model.spec.input_names])[0].numpy()}

    def off_on_short(feeds):
        out = eager(feeds)["embedding"].copy()
        short = feeds["attention_mask"].sum(1) <= 3
        out[short] += 0.5 * np.linalg.norm(out[short], axis=1, keepdims=True)
        return {"embedding": out}
    good = check_text(model, processing, folder, eager, 0.9999)
    assert good.passed and good.source_min_cosine >= 0.9999 and not good.variant_fault
    bad = check_text(model, processing, folder, off_on_short, 0.999)
    assert not bad.passed and bad.inputs_equal and bad.min_cosine < 0.99 and bad.variant_fault

    model.module.forward = lambda ids, mask: (mask[:, :16].float(),)  # a source that answers otherwise than ST
    wrong = check_text(model, processing, folder, eager, 0.999)
    assert not wrong.passed and wrong.source_min_cosine < 0.9999 and not wrong.variant_fault
