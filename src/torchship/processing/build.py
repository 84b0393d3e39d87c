"""A bundle's processing at optimize time: the record and its files from the source, and the end-to-end check of raw
input through the bundle's pipeline against the original library's pipeline (torch and transformers are here)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import Processing, ProcessingCheck, TextProcessing, pipeline

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

# text nobody tunes for: what a served embedding model gets (besides the source's own held-out sentences)
HARD_TEXT = {
    "empty": "",
    "whitespace": " \t\n  ",
    "accents": "Straße, naïve café in München: Ærøskøbing and São Paulo",
    "cjk": "日本語の文章を埋め込みに変換します。中文句子也一样。",
    "cyrillic and arabic": "Привет, как дела? مرحبا بالعالم",
    "emoji": "great release 🚀🔥👍🏽 — works 👨‍👩‍👧 fine",
    "one word": "ok",
    "markup": "<b>bold</b> & \"quoted\" 'text' {json: [1, 2]} C:\\path\\file.txt",
}
LONG_TEXT = ("The quarterly report was delayed because every figure in it had to be checked twice by hand. " * 40).strip()


def text_processing(model, workdir: Path, max_length: int | None = None) -> tuple[Processing, list[tuple[Path, str]]] | str | None:
    """The text record of ``model`` (its tokenizer's ``tokenizer.json`` written into ``workdir``), or why there is
    none (a line), or None for a model that takes no text."""
    names = model.spec.input_names
    tok = model.tokenizer
    if tok is None or "input_ids" not in names:
        return None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return (f"text processing not packaged: the tokenizer ({type(tok).__name__}) has no tokenizer.json (a slow "
                "tokenizer); save a fast one beside the model")
    from tokenizers import Tokenizer
    length = min(filter(None, (model.text_length, max_length)), default=None) or model.dims.get("seq") or 512
    own = Tokenizer.from_str(backend.to_str())
    own.no_padding()
    own.no_truncation()
    workdir.mkdir(parents=True, exist_ok=True)
    own.save(str(workdir / "tokenizer.json"))
    ids = model.spec.by_name["input_ids"]
    record = TextProcessing(
        max_length=int(length), mask="attention_mask" if "attention_mask" in names else None,
        type_ids="token_type_ids" if "token_type_ids" in names else None,
        pad_id=int(tok.pad_token_id) if getattr(tok, "pad_token_id", None) is not None else 0,
        vocab_size=ids.range[1] if ids.range else (len(tok) or None),
        output="embedding" if model.task == "embed" and "embedding" in model.spec.output_names else None)
    return Processing(text=record), [(workdir / "tokenizer.json", "tokenizer.json")]


def check_texts(model) -> tuple[list[str], tuple[str, ...]]:
    """What the text pipeline is checked on: the source's own held-out sentences (for zoo:minilm) and the hard cases,
    in one batch of mixed lengths."""
    own = []
    if model.name == "minilm":
        from ..zoo.minilm import sentences
        own = sentences(16, seed=7)
    texts = own + list(HARD_TEXT.values()) + [LONG_TEXT]
    cases = (("held-out sentences",) if own else ()) + tuple(HARD_TEXT) + ("longer than the model takes",
                                                                            "mixed lengths in one batch")
    return texts, cases


def _reference(model, record: TextProcessing, texts: list[str]) -> tuple[np.ndarray, list[list[int]], str]:
    """The original library's own pipeline on ``texts``: sentence-transformers' ``encode`` for its directories, else
    the transformers tokenizer and the eager fp32 model."""
    import torch
    tok = model.tokenizer
    enc = tok(texts, padding=True, truncation=True, max_length=record.max_length, return_tensors="np")
    lengths = enc["attention_mask"].sum(1)
    ids = [list(map(int, row[:n])) for row, n in zip(enc["input_ids"], lengths)]
    if model.text_reference is not None:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(model.text_reference), device="cpu")
        st.max_seq_length = record.max_length
        out = st.encode(texts, batch_size=len(texts), convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32), ids, "sentence-transformers encode() on the source directory"
    feeds = {n: enc[n].astype(np.int64) for n in model.spec.input_names}
    with torch.inference_mode():
        outs = model.module(*[torch.from_numpy(feeds[n]) for n in model.spec.input_names])
    names = model.spec.output_names
    out = outs[names.index(record.output)] if record.output else outs[0]
    return out.float().numpy(), ids, "the transformers tokenizer and the model in eager fp32"


def check_text(model, processing: Processing, folder: Path, run: Runner, floor: float) -> ProcessingCheck:
    """Raw text through the bundle's pipeline (its tokenizer.json, then ``run``, the chosen variant) against the
    original library's pipeline, item by item: the same tokens, and cosine >= ``floor`` for every item."""
    record = processing.text
    texts, cases = check_texts(model)
    feeds = pipeline(processing, folder).encode(texts)
    outs = run(feeds)
    got = np.asarray(outs[record.output] if record.output else next(iter(outs.values())), dtype=np.float32)
    want, ids, reference = _reference(model, record, texts)
    mask = feeds.get(record.mask) if record.mask else None
    mine = [list(map(int, row[:int(m.sum())])) if mask is not None else list(map(int, row))
            for row, m in zip(feeds[record.ids], mask if mask is not None else feeds[record.ids])]
    if got.ndim == 3 and want.ndim == 3:  # per-token outputs: compare the real tokens only
        got, want = [g[:len(r)] for g, r in zip(got, mine)], [w[:len(r)] for w, r in zip(want, ids)]
    cos, worst = [], 0.0
    for g, w in zip(got, want):
        g, w = np.ravel(g).astype(np.float64), np.ravel(w).astype(np.float64)
        if g.shape != w.shape:
            cos.append(-1.0)
            continue
        cos.append(float(g @ w / max(np.linalg.norm(g) * np.linalg.norm(w), 1e-30)))
        worst = max(worst, float(np.abs(g - w).max()))
    equal = mine == ids
    return ProcessingCheck(reference=reference, items=len(texts), cases=cases, min_cosine=round(min(cos), 7),
                           max_abs_error=worst, tokens_equal=equal, passed=equal and min(cos) >= floor, floor=floor)
