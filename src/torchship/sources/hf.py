"""Hugging Face transformers model directories (extra ``nlp``)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping

import numpy as np

from ..arch import Architecture
from ..modules import MeanPooled, transformers
from ..errors import SourceError
from ..spec import IOSpec

SPEC = IOSpec.parse(["input_ids:int64[batch,seq]", "attention_mask:int64[batch,seq]"])


def load_hf_dir(path: Path, dims: Mapping[str, int], *, pooling: str | None = None, name: str | None = None,
                sentences: list[str] | None = None):
    from .model import finish
    tf = transformers()
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
    arch = Architecture("hf", tuple(SPEC.input_names), type(encoder).__name__, keys=tuple(keys) if keys else None,
                        by_keyword=pooling != "mean", config=encoder.config.to_dict(), pooling=pooling)
    return replace(model, arch=arch, tokenizer=tokenizer,
                   eval_data=tokenize(tokenizer, sentences, dims["seq"]) if sentences else None)


def tokenize(tokenizer, sentences: list[str], seq: int) -> dict[str, np.ndarray]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
