"""Built-in models: ``zoo:digits-cnn`` (trained here in seconds) and ``zoo:minilm`` (extra ``nlp``)."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import SourceError

NAMES = ("digits-cnn", "minilm")


def cache_dir() -> Path:
    root = os.environ.get("TORCHSHIP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchship"
    path = Path(root) / "zoo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _unknown(name: str) -> SourceError:
    return SourceError(f"zoo:{name} is not a built-in model; choose one of: {', '.join('zoo:' + n for n in NAMES)}")


def load_zoo(name: str):
    if name == "digits-cnn":
        from .digits import load
        return load()
    if name == "minilm":
        from .minilm import load
        return load()
    raise _unknown(name)


def architecture(name: str) -> nn.Module:
    if name == "digits-cnn":
        from .digits import architecture as arch
        return arch()
    raise _unknown(name)
