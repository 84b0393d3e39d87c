"""Load a model from where it lives.

A source string is one of:
  ``zoo:NAME``                 a built-in model (``torchship.zoo``)
  ``package.module:attr``      an nn.Module, or a zero-argument factory returning one
  ``FILE.pt2``                 a torch.export ExportedProgram
  ``FILE.onnx``                an ONNX model (ONNX Runtime variants only)
  ``FILE.pt`` / ``FILE.ts``    a TorchScript module
  ``DIR``                      a Hugging Face transformers model directory

``module:package.module:attr`` and ``file:PATH`` say which kind a string is where it could read as another
(a module of your own named ``zoo``, a file whose name has a colon).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..arch import Architecture
from ..errors import SourceError, UsageError
from ..modules import import_attr, instantiate
from ..spec import IOSpec
from .model import Model, finish, guess_task, infer_outputs, keys_of

__all__ = ["Model", "finish", "guess_task", "infer_outputs", "load_source"]


def load_source(source: Any, inputs: list[str] | None = None, *, weights: str | None = None,
                dims: Mapping[str, int] | None = None, outputs: list[str] | None = None,
                example: Mapping | None = None) -> Model:
    """Load ``source`` (a string as in this module's docstring, or an nn.Module) into a Model. ``example``: the
    user's data, to run a module on first (where it fits the inputs) instead of generated values."""
    dims = dict(dims or {})
    if isinstance(source, nn.Module):
        if not inputs:
            raise UsageError("an nn.Module needs its inputs, e.g. inputs=['x:float32[batch,3,28,28]']")
        return finish(type(source).__name__, source, IOSpec.parse(inputs), dims, outputs=outputs, weights=weights,
                      example=example)
    source = str(source)
    if source.startswith("module:"):
        return _load_python(source[len("module:"):], inputs, weights, dims, outputs, example)
    if source.startswith("file:"):
        return _load_path(Path(source[len("file:"):]), inputs, dims, outputs)
    if source.startswith("zoo:"):
        from .zoo import load_zoo
        return load_zoo(source[4:], dims)
    path = Path(source)
    if path.is_dir() or path.suffix in (".pt2", ".onnx", ".pt", ".ts", ".pth", ".ckpt", ".safetensors"):
        return _load_path(path, inputs, dims, outputs)
    if ":" in source and not path.exists():
        return _load_python(source, inputs, weights, dims, outputs, example)
    raise SourceError(f"{source!r} is not a source torchship knows: use zoo:NAME, package.module:attr, "
                      "a .pt2/.onnx/TorchScript file, or a Hugging Face model directory")


def _load_path(path: Path, inputs, dims, outputs) -> Model:
    if path.is_dir():
        from .hf import load_hf_dir
        return load_hf_dir(path, dims)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    from .files import load_file
    return load_file(path, inputs, dims, outputs)


def _load_python(ref: str, inputs, weights, dims, outputs, example=None) -> Model:
    module = instantiate(import_attr(ref), ref)
    if not inputs:
        declared = getattr(module, "example_inputs", None)
        if isinstance(declared, (list, tuple)) and all(isinstance(s, str) for s in declared):
            inputs = list(declared)
        else:
            raise UsageError(f"{ref}: give the inputs, e.g. --input x:float32[batch,3,28,28]")
    model = finish(ref.split(":")[-1], module, IOSpec.parse(inputs), dims, outputs=outputs, weights=weights,
                   example=example)
    return replace(model, arch=Architecture("python", tuple(model.spec.input_names), ref, keys=keys_of(model.module)))


