"""Normalize any module to positional inputs in spec order and a tuple of tensors out."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import SourceError
from ..spec import BATCH, IOSpec, TensorSpec


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

    def __init__(self, module: nn.Module, input_names: Sequence[str], keys: Sequence[str] | None = None, by_keyword: bool = False):
        super().__init__()
        self.module = module
        self.input_names = list(input_names)
        self.keys = list(keys) if keys else None
        self.by_keyword = by_keyword

    def forward(self, *args):
        if self.by_keyword:
            out = self.module(**dict(zip(self.input_names, args)))
        else:
            out = self.module(*args)
        return flatten_outputs(out, self.keys)


def to_torch(feeds: Mapping[str, np.ndarray], names: Sequence[str], device="cpu") -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names)


def to_numpy(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: t.detach().float().cpu().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.detach().cpu().numpy()
            for n, t in zip(names, tensors)}


def infer_outputs(module: nn.Module, spec: IOSpec, dims: Mapping[str, int], names: Sequence[str] | None = None) -> tuple[TensorSpec, ...]:
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
        specs.append(TensorSpec(name, dt if dt in ("float32", "float16", "float64", "int64", "int32", "bool") else "float32", tuple(axes)))
    return tuple(specs)
