"""Hugging Face transformers model directories (extra ``nlp``)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from torch import nn

from ..errors import MissingExtra, SourceError
from ..spec import IOSpec
from ._wrap import Normalized


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingExtra("transformers", "nlp") from exc
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


class MeanPooled(nn.Module):
    """Sentence embedding: attention-masked mean of the last hidden state, L2-normalized."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return (nn.functional.normalize(summed, dim=-1),)


SPEC = IOSpec.parse(["input_ids:int64[batch,seq]", "attention_mask:int64[batch,seq]"])


def load_hf_dir(path: Path, dims: Mapping[str, int], *, pooling: str | None = None, name: str | None = None,
                sentences: list[str] | None = None):
    from . import finish
    tf = _transformers()
    if not (path / "config.json").exists():
        raise SourceError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
        encoder = tf.AutoModel.from_pretrained(str(path)).eval()
    except Exception as exc:
        raise SourceError(f"cannot load the transformers model in {path}: {str(exc).splitlines()[0]}") from exc
    dims = {"seq": int(dims.get("seq", 128))}
    if pooling == "mean":
        module, keys, outputs, task = MeanPooled(encoder), None, ["embedding"], "embed"
    else:
        module, keys, outputs, task = encoder, ["last_hidden_state"], ["last_hidden_state"], "other"
    model = finish(name or path.name, module, SPEC, dims, task=task, outputs=outputs, by_keyword=pooling != "mean")
    if keys:
        model.module.keys = keys
    model.arch = {"kind": "hf", "config": encoder.config.to_dict(), "pooling": pooling}
    model.tokenizer = tokenizer
    if sentences:
        model.eval_data = tokenize(tokenizer, sentences, dims["seq"])
    return model


def tokenize(tokenizer, sentences: list[str], seq: int) -> dict[str, np.ndarray]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def rebuild_hf(arch: Mapping, root=None) -> nn.Module:
    tf = _transformers()
    cfg = dict(arch["config"])
    config = tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    encoder = tf.AutoModel.from_config(config).eval()
    if arch.get("pooling") == "mean":
        return Normalized(MeanPooled(encoder), list(SPEC.input_names))
    return Normalized(encoder, list(SPEC.input_names), ["last_hidden_state"], by_keyword=True)
