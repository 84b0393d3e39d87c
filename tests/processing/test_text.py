"""Text in, answers out: a bundle carries its tokenizer (tokenizer.json) and the pooling inside its graph, is checked
end to end against the original library's pipeline when it is built, and takes a list of strings from Python."""
import json

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
