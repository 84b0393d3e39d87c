"""Load a model from where it lives.

A source string is one of:
  ``zoo:NAME``                 a built-in model (``torchship.zoo``)
  ``package.module:attr``      an nn.Module, or a zero-argument factory returning one
  ``FILE.pt2``                 a torch.export ExportedProgram
  ``FILE.onnx``                an ONNX model (ONNX Runtime variants only)
  ``FILE.pt`` / ``FILE.ts``    a TorchScript module
  ``DIR``                      a Hugging Face transformers model directory
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import SourceError, UsageError
from ..spec import IOSpec
from ._wrap import Normalized, infer_outputs, output_keys, to_torch


@dataclass
class Model:
    """A loaded model: a normalized module (inputs in spec order, tuple of tensors out) and its IOSpec.

    ``arch`` says how a fresh process rebuilds the architecture (see ``rebuild``); weights travel as
    safetensors beside it. ``eval_data``/``labels`` are held-out inputs for verification, when known.
    """

    name: str
    module: nn.Module | None
    spec: IOSpec
    task: str = "other"  # classify | embed | other
    arch: dict | None = None
    eval_data: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    dims: dict[str, int] = field(default_factory=dict)
    onnx_path: Path | None = None
    tokenizer: Any = None
    source: str | None = None  # re-loadable source string for a fresh process, where no arch is known
    was_training: bool = False  # the module as given was in training mode (torchship runs it in eval mode)
    calibration_data: dict[str, np.ndarray] | None = None  # representative inputs for static int8, apart from eval_data


def load_source(source: Any, inputs: list[str] | None = None, *, weights: str | None = None,
                dims: Mapping[str, int] | None = None, outputs: list[str] | None = None) -> Model:
    """Load ``source`` (a string as in this module's docstring, or an nn.Module) into a Model."""
    dims = dict(dims or {})
    if isinstance(source, nn.Module):
        if not inputs:
            raise UsageError("an nn.Module needs its inputs, e.g. inputs=['x:float32[batch,3,28,28]']")
        return finish(type(source).__name__, source, IOSpec.parse(inputs), dims, outputs=outputs, weights=weights)
    source = str(source)
    if source.startswith("zoo:"):
        from ..zoo import load_zoo
        return load_zoo(source[4:])
    path = Path(source)
    if path.is_dir():
        from .hf import load_hf_dir
        return load_hf_dir(path, dims)
    if path.suffix in (".pt2", ".onnx", ".pt", ".ts", ".pth", ".ckpt", ".safetensors"):
        if not path.exists():
            raise SourceError(f"{source}: no such file")
        from .files import load_file
        return load_file(path, inputs, dims, outputs)
    if ":" in source and not path.exists():
        return _load_python(source, inputs, weights, dims, outputs)
    raise SourceError(f"{source!r} is not a source torchship knows: use zoo:NAME, package.module:attr, "
                      "a .pt2/.onnx/TorchScript file, or a Hugging Face model directory")


def _import_attr(ref: str):
    mod_name, _, attr = ref.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current directory is importable
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SourceError(f"cannot import {mod_name!r} ({exc}); run from the directory that holds it or install it") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _instantiate(obj, ref: str) -> nn.Module:
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


def _load_python(ref: str, inputs, weights, dims, outputs) -> Model:
    module = _instantiate(_import_attr(ref), ref)
    if not inputs:
        example = getattr(module, "example_inputs", None)
        if isinstance(example, (list, tuple)) and all(isinstance(s, str) for s in example):
            inputs = list(example)
        else:
            raise UsageError(f"{ref}: give the inputs, e.g. --input x:float32[batch,3,28,28]")
    model = finish(ref.split(":")[-1], module, IOSpec.parse(inputs), dims, outputs=outputs, weights=weights)
    model.arch = {"kind": "python", "ref": ref, "inputs": [t.to_dict() for t in model.spec.inputs], "keys": model.module.keys}
    return model


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict without unpickling arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
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


def finish(name: str, module: nn.Module, spec: IOSpec, dims: Mapping[str, int], *, task: str | None = None,
           outputs: list[str] | None = None, weights: str | None = None, by_keyword: bool = False, **kw) -> Model:
    """Normalize ``module``, check it runs on the spec, infer its outputs and task."""
    if weights:
        try:
            module.load_state_dict(load_weights(weights))
        except RuntimeError as exc:
            raise SourceError(f"weights in {weights} do not fit {name}: {str(exc).splitlines()[0]}") from exc
    was_training = any(m.training for m in module.modules())
    module = module.eval()
    dims = {s: int(dims.get(s, 16)) for s in spec.symbols}
    from ..inspect import watch
    args = to_torch(spec.sample(2, dims), spec.input_names)
    with watch(module) as w:
        try:
            with torch.inference_mode():
                raw = module(**dict(zip(spec.input_names, args))) if by_keyword else module(*args)
        except Exception as exc:
            where = f"in module {w.current!r}: " if w.current else ""
            raise SourceError(f"{name} fails on an example input {' '.join(map(str, spec.inputs))}: {where}"
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    norm = Normalized(module, spec.input_names, output_keys(raw), by_keyword).eval()
    out_specs = infer_outputs(norm, spec, dims, outputs or norm.keys)
    spec = IOSpec(spec.inputs, out_specs)
    if task is None:
        task = guess_task(out_specs)
    return Model(name, norm, spec, task=task, dims=dims, was_training=was_training, **kw)


def guess_task(outputs) -> str:
    """A classifier has one [batch, C] output with C > 1 (top-1 agreement is then measured)."""
    o = outputs[0] if len(outputs) == 1 else None
    return ("classify" if o is not None and len(o.shape) == 2 and o.shape[0] == "batch"
            and isinstance(o.shape[1], int) and o.shape[1] > 1 else "other")


def rebuild(arch: Mapping, root: Path | None = None) -> nn.Module:
    """Rebuild a normalized architecture (weights not loaded) in a fresh process."""
    kind = arch["kind"]
    if kind == "python":
        module = _instantiate(_import_attr(arch["ref"]), arch["ref"])
        return Normalized(module, [t["name"] for t in arch["inputs"]], arch.get("keys")).eval()
    if kind == "zoo":
        from ..zoo import architecture
        return architecture(arch["name"]).eval()
    if kind == "hf":
        from .hf import rebuild_hf
        return rebuild_hf(arch, root).eval()
    raise SourceError(f"unknown architecture kind {kind!r}")
