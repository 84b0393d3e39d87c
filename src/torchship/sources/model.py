"""The record every source becomes: a normalized module, its IOSpec, and what verification can use."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..arch import Architecture
from ..errors import SourceError
from ..modules import Normalized, load_weights, output_keys, to_torch
from ..spec import BATCH, IOSpec, TensorSpec


@dataclass(frozen=True)
class Model:
    """A loaded model: a normalized module (inputs in spec order, tuple of tensors out) and its IOSpec.

    A fresh process rebuilds it from ``arch`` (with weights saved beside it) or reloads ``file`` (a .pt2 or
    TorchScript file); an ONNX source has no module, only ``onnx_path``. ``eval_data``/``labels`` are held-out
    inputs for verification, when known; ``calibration_data`` representative inputs for static int8.
    """

    name: str
    module: nn.Module | None
    spec: IOSpec
    task: str = "other"  # classify | embed | other
    arch: Architecture | None = None
    eval_data: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    dims: dict[str, int] = field(default_factory=dict)
    onnx_path: Path | None = None
    file: Path | None = None  # the .pt2 or TorchScript file the module was loaded from
    tokenizer: Any = None
    was_training: bool = False  # the module as given was in training mode (torchship runs it in eval mode)
    calibration_data: dict[str, np.ndarray] | None = None


def keys_of(module: Normalized) -> tuple[str, ...] | None:
    return tuple(module.keys) if module.keys else None


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
    from ..hooks import watch
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


def infer_outputs(module: nn.Module, spec: IOSpec, dims: Mapping[str, int],
                  names: Sequence[str] | None = None) -> tuple[TensorSpec, ...]:
    """Run the module at two sizes and name each output axis (batch, a symbol, or an int)."""
    sizes = [(2, {s: dims.get(s, 8) for s in spec.symbols}), (3, {s: dims.get(s, 8) + 1 for s in spec.symbols})]
    shapes = []
    with torch.inference_mode():
        for batch, d in sizes:
            outs = module(*to_torch(spec.sample(batch, d), spec.input_names))
            shapes.append([tuple(o.shape) for o in outs])
            dtypes = [str(o.dtype).removeprefix("torch.") for o in outs]
    names = list(names) if names else (["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
    if len(names) != len(outs):
        raise SourceError(f"model returns {len(outs)} outputs, but {len(names)} output names were given")
    specs = []
    for name, dt, s0, s1 in zip(names, dtypes, *shapes):
        axes = []
        for i, (a, b) in enumerate(zip(s0, s1)):
            if a == b:
                axes.append(a)
            elif (a, b) == (sizes[0][0], sizes[1][0]):
                axes.append(BATCH)
            else:
                match = [s for s in spec.symbols if (sizes[0][1][s], sizes[1][1][s]) == (a, b)]
                axes.append(match[0] if match else f"{name}_dim{i}")
        specs.append(TensorSpec(name, dt if dt in ("float32", "float16", "float64", "int64", "int32", "bool") else "float32",
                                tuple(axes)))
    return tuple(specs)
