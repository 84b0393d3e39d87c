"""The module every model runs through, and how any process rebuilds one from its ``Architecture``.

``Normalized`` turns a user's module into ``forward(*inputs in spec order) -> tuple of tensors``; ``rebuild`` makes
it again (weights not loaded) from an architecture record; ``load_weights`` reads a state dict without unpickling.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .arch import Architecture
from .errors import SourceError, UntrustedCode


def flatten_outputs(out, keys: Sequence[str] | None = None) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        return tuple(out[k] for k in (keys or list(out.keys())))
    if isinstance(out, (tuple, list)):
        return tuple(out)
    raise SourceError(f"model returned {type(out).__name__}; expected a tensor, a tuple of tensors or a dict of tensors")


def output_keys(out) -> list[str] | None:
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        return [k for k in out.keys() if isinstance(out[k], torch.Tensor)]
    return None


class Normalized(nn.Module):
    """``forward(*inputs in spec order) -> tuple[Tensor, ...]`` around a user's module."""

    def __init__(self, module: nn.Module, input_names: Sequence[str], keys: Sequence[str] | None = None,
                 by_keyword: bool = False, kwargs: Mapping | None = None):
        super().__init__()
        self.module = module
        self.input_names = list(input_names)
        self.keys = list(keys) if keys else None
        self.by_keyword = by_keyword
        self.kwargs = dict(kwargs or {})  # fixed keyword arguments of every call (use_cache=False, ...)

    def forward(self, *args):
        if self.by_keyword:
            out = self.module(**dict(zip(self.input_names, args)), **self.kwargs)
        else:
            out = self.module(*args, **self.kwargs)
        return flatten_outputs(out, self.keys)


def inner(module: nn.Module) -> nn.Module:
    """The user's own module inside a Normalized wrapper (names and state-dict keys as the user wrote them)."""
    return module.module if isinstance(module, Normalized) else module


class Exported(nn.Module):
    """A torch.export program's module; its train/eval mode cannot be changed, so eval() is a no-op."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return self.gm(*args)

    def train(self, mode: bool = True):
        return self


def read_program(path: Path):
    """A torch.export program (``.pt2``) as an ExportedProgram, after ``safety.check_pt2`` found nothing in it that
    torch's reader would unpickle; an AOTInductor package (compiled native code) is refused here."""
    from .errors import UnsafeFile
    from .safety import check_pt2
    if check_pt2(path).native:
        raise UnsafeFile(f"{path} is an AOTInductor package (compiled native code), not a torch.export program; "
                         "give the program it was compiled from")
    importlib.import_module("torch.ao.quantization.fx._decomposed")  # the int8 ops a QAT/PT2E program uses
    return torch.export.load(str(path))


def load_program(path: Path) -> Exported:
    return Exported(read_program(path).module())


def to_torch(feeds: Mapping[str, np.ndarray], names: Sequence[str], device="cpu") -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names)


def import_attr(ref: str):
    """``package.module:attr`` imported from ``sys.path`` as it stands (nothing is added to it here)."""
    mod_name, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SourceError(f"cannot import {mod_name!r} ({exc}); run from the directory that holds it or install it") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def instantiate(obj, ref: str) -> nn.Module:
    """An nn.Module as it is, or what a zero-argument factory (or class) returns."""
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            made = obj()
        except TypeError as exc:
            raise SourceError(f"{ref} must be an nn.Module or take no arguments ({exc})") from exc
        if isinstance(made, nn.Module):
            return made
    raise SourceError(f"{ref} is not an nn.Module nor a factory that returns one")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from ``torch.load(weights_only=True)``: nothing arbitrary is unpickled."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors' own error type (SafetensorError) or an OSError
            raise SourceError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:160]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(f"{path} cannot be loaded with weights_only=True ({str(exc).splitlines()[0]}); "
                          "save a state_dict with safetensors.torch.save_file instead") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SourceError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def rebuild(arch: Architecture, *, trust_code: bool = True) -> Normalized:
    """The normalized module (weights not loaded). A ``python`` architecture from outside torchship imports the
    user's code: without ``trust_code`` that is refused with what would be imported and how to allow it."""
    if arch.kind == "python":
        if arch.imports and not trust_code:
            raise UntrustedCode(f"this bundle rebuilds its model by importing Python code ({arch.ref}); load it only "
                                "if you trust that code: torchship serve/load --trust-code, or trust_code=True in Python")
        module = instantiate(import_attr(arch.ref), arch.ref)
    elif arch.kind == "zoo":
        from .zoo import architecture
        module = architecture(arch.ref)
    else:
        module = hf_module(arch)
    return Normalized(module, arch.inputs, arch.keys, arch.by_keyword, arch.kwargs).eval()


class MeanPooled(nn.Module):
    """Sentence embedding: attention-masked mean of the last hidden state, L2-normalized unless ``normalize`` is off
    (a sentence-transformers model without a Normalize module)."""

    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize
        self.train(encoder.training)  # in the mode of the encoder it wraps (from_pretrained: eval)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return (nn.functional.normalize(summed, dim=-1) if self.normalize else summed,)


POOLINGS = ("mean", "mean-raw")  # Architecture.pooling: mean-pooled and L2-normalized, or mean-pooled only


def transformers():
    from .errors import MissingExtra
    try:
        import transformers as tf
    except ImportError as exc:
        raise MissingExtra("transformers", "nlp") from exc
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    return tf


def hf_class(name: str):
    """A model class of the transformers library by name (never code from a model directory)."""
    tf = transformers()
    cls = getattr(tf, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, tf.PreTrainedModel):
        raise SourceError(f"{name!r} is not a model class of transformers {tf.__version__}")
    return cls


def hf_module(arch: Architecture) -> nn.Module:
    """A transformers model from its config, with random weights (the bundle's weights are loaded afterwards)."""
    tf = transformers()
    cfg = dict(arch.config or {})
    config = tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = hf_class(arch.ref)._from_config(config).eval()
    return MeanPooled(model, normalize=arch.pooling == "mean") if arch.pooling in POOLINGS else model
