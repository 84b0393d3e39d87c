"""Hugging Face transformers model directories (extra ``nlp``), by task.

The class is the one the directory was saved with (``config.architectures``); the inputs follow from what
transformers itself knows of it (``main_input_name``, the forward's parameters, the tokenizer's input names): token
ids and masks for text, ``pixel_values`` for vision, ``input_values`` for audio; every tensor the model returns is an
output under its own name. Nothing in the directory is run as code (no ``trust_remote_code``).
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import numpy as np

from ..arch import Architecture
from ..errors import SourceError
from ..modules import POOLINGS, MeanPooled, hf_class, transformers
from ..spec import IOSpec, TensorSpec

SPEC = IOSpec.parse(["input_ids:int64[batch,seq]", "attention_mask:int64[batch,seq]"])  # mean-pooled sentence encoders
log = logging.getLogger("torchship")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
MODULE_ATTR_HINT = ("pass the model as package.module:attr (a factory that loads it and returns an nn.Module) with "
                    "--input NAME:DTYPE[DIMS] for what it takes")


def _inputs(model, config, tokenizer) -> tuple[list[TensorSpec], dict[str, int]]:
    """The model's inputs as specs, with the sizes of their dynamic dimensions for timing."""
    main = getattr(model, "main_input_name", "input_ids")
    accepts = set(inspect.signature(model.forward).parameters)
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        specs = [TensorSpec("input_ids", "int64", ("batch", "seq"), (0, vocab) if vocab else None)]
        names = set(getattr(tokenizer, "model_input_names", None) or ("input_ids", "attention_mask"))
        if "attention_mask" in accepts and "attention_mask" in names:
            specs.append(TensorSpec("attention_mask", "int64", ("batch", "seq"), (0, 2)))
        types = getattr(config, "type_vocab_size", None)
        if "token_type_ids" in accepts and "token_type_ids" in names and types:
            specs.append(TensorSpec("token_type_ids", "int64", ("batch", "seq"), (0, types)))
        longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 128
        return specs, {"seq": min(128, int(longest))}
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return [TensorSpec("pixel_values", "float32", ("batch", int(getattr(config, "num_channels", 3)), int(h), int(w)))], {}
    if main == "input_values":
        return [TensorSpec("input_values", "float32", ("batch", "samples"))], {"samples": 16000}
    if main == "input_features" and getattr(config, "num_mel_bins", None):  # log-mel frames (Whisper: a fixed count)
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        return [TensorSpec("input_features", "float32", ("batch", int(config.num_mel_bins), frames))], {}
    raise SourceError(f"{type(model).__name__} takes {main!r}: a task torchship does not handle from a directory; "
                      + MODULE_ATTR_HINT)


def sentence_transformers_dir(path: Path) -> tuple[str | None, int | None]:
    """(pooling, max_seq_length) of a sentence-transformers directory, read from its JSON (no code runs): "mean" for
    a Transformer, mean Pooling and Normalize; "mean-raw" without Normalize; None where the directory is not one, or
    holds modules torchship does not put in the graph (a Dense layer, CLS pooling): then the encoder's own outputs."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        length = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None, None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    pool = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")), None)
    try:
        cfg = json.loads((path / pool["path"] / "config.json").read_text()) if pool else {}
    except (OSError, ValueError, KeyError):
        cfg = {}
    mean = cfg.get("pooling_mode") == "mean" or (cfg.get("pooling_mode_mean_tokens") is True and not any(
        cfg.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")))
    length = int(length) if isinstance(length, int) and length > 0 else None
    if kinds[:2] != ["Transformer", "Pooling"] or not mean or kinds[2:] not in ([], ["Normalize"]):
        log.info("%s: sentence-transformers modules %s: only Transformer, mean Pooling and Normalize go into the graph; "
                 "loading the encoder's own outputs", path, kinds)
        return None, length
    return ("mean" if kinds[2:] == ["Normalize"] else "mean-raw"), length


def _text_length(tokenizer, config, given: int | None) -> int | None:
    """The tokens a text is cut to: the sentence-transformers length, else the tokenizer's, within the positions."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    found = given or getattr(tokenizer, "model_max_length", None)
    found = found if isinstance(found, int) and 0 < found < 1 << 20 else None
    return min(filter(None, (found, positions)), default=None)


def _needs_decoder(cls) -> bool:
    """The class's forward runs a decoder too (it takes decoder inputs): decided from the forward itself, not the
    config's is_encoder_decoder (Whisper's audio classifier runs its encoder and a head, in one pass)."""
    params = inspect.signature(cls.forward).parameters
    return any(p.startswith("decoder_") for p in params)


def load_hf_dir(path: Path, dims: Mapping[str, int], *, pooling: str | None = None, name: str | None = None,
                sentences: list[str] | None = None):
    from .model import finish
    tf = transformers()
    if not (path / "config.json").exists():
        raise SourceError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    st_pooling, st_length = sentence_transformers_dir(path)
    pooling = pooling or st_pooling
    try:
        config = tf.AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise SourceError(f"cannot read the config in {path}: {str(exc).splitlines()[0]}") from exc
    saved = (config.architectures or [None])[0]
    cls = hf_class(saved) if saved else None
    if cls is None:  # no architecture recorded: the base model of its type
        cls = type(tf.AutoModel.from_config(config))
    if config.is_encoder_decoder and _needs_decoder(cls):
        raise SourceError(f"{cls.__name__} in {path} is an encoder-decoder; torchship optimizes one forward pass: save its "
                          f"encoder alone (for T5, T5EncoderModel), or {MODULE_ATTR_HINT}")
    try:
        model = cls.from_pretrained(str(path)).eval()
    except Exception as exc:
        raise SourceError(f"cannot load {cls.__name__} from {path}: {str(exc).splitlines()[0]}") from exc
    tokenizer, image_processor = None, None
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        try:
            image_processor = tf.AutoImageProcessor.from_pretrained(str(path))
        except Exception:  # a model saved without its image processor: the pixels are the user's to give
            image_processor = None
    # only a tokenizer saved with the model: transformers makes one of special tokens alone from a bare config (every
    # word would be [UNK]), which a bundle must not carry as the model's
    if getattr(model, "main_input_name", "input_ids") == "input_ids" and any((path / f).exists() for f in TOKENIZER_FILES):
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
        except Exception:  # a model saved without its tokenizer: the ids are the user's to give
            tokenizer = None
    if pooling in POOLINGS:
        module, inputs, sizes, kwargs = MeanPooled(model, normalize=pooling == "mean"), list(SPEC.inputs), None, None
        sizes = {"seq": min(128, _text_length(None, config, None) or 128)}
        task, outputs, by_keyword = "embed", ["embedding"], False
    else:
        specs, sizes = _inputs(model, config, tokenizer)
        inputs, module, task, outputs, by_keyword = specs, model, None, None, True
        params = inspect.signature(model.forward).parameters
        kwargs = {"return_dict": True, **({"use_cache": False} if "use_cache" in params else {})}
    dims = {k: int(dims.get(k, v)) for k, v in sizes.items()}
    m = finish(name or path.name, module, IOSpec(tuple(inputs)), dims, task=task, outputs=outputs, by_keyword=by_keyword,
               kwargs=kwargs)
    keys = tuple(m.module.keys) if m.module.keys else None
    arch = Architecture("hf", tuple(m.spec.input_names), type(model).__name__, keys=keys, by_keyword=by_keyword,
                        config=model.config.to_dict(), pooling=pooling, kwargs=kwargs)
    log.info("loaded %s (%s) from %s: %s", type(model).__name__, m.task, path, m.spec)
    reference = path if st_pooling is not None and pooling == st_pooling else None
    id2label = getattr(config, "id2label", None) or {}
    names = tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))) or None
    return replace(m, arch=arch, tokenizer=tokenizer, text_length=_text_length(tokenizer, config, st_length),
                   text_reference=reference, image_processor=image_processor, class_names=names,
                   texts=tuple(sentences) if sentences else None,
                   eval_data=tokenize(tokenizer, sentences, dims["seq"]) if sentences else None)


def tokenize(tokenizer, sentences: list[str], seq: int) -> dict[str, np.ndarray]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
