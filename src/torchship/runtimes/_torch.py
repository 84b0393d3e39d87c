"""Helpers shared by the runtimes that run on torch (eager, TorchScript, compile, AOTInductor)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import BuildSkipped
from ..spec import BATCH, IOSpec
from .base import LoadContext

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


DIM_MAX = 1 << 16  # the largest size a dynamic dimension may take in an exported program, unless the model says less


def dynamic_shapes(spec: IOSpec, ranges: dict[str, tuple[int, int]] | None = None) -> tuple[tuple[dict, ...]]:
    """torch.export dynamic shapes for a normalized ``forward(*inputs)``: one Dim per symbol, shared across inputs,
    from 1 (a batch of one is the commonest request) to DIM_MAX unless ``ranges`` narrows it."""
    ranges = ranges or {}
    syms = {s: torch.export.Dim(s, min=ranges.get(s, (1, DIM_MAX))[0], max=ranges.get(s, (1, DIM_MAX))[1])
            for s in [BATCH, *spec.symbols]}
    return (tuple({i: syms[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs),)


_FIX = re.compile(r"^\s*(\w+) = (?:Dim\('\w+'(?:, min=(\d+))?(?:, max=(\d+))?\)|(\d+))\s*$", re.M)


def export_dynamic(module, args, spec: IOSpec):
    """(torch.export program, the range of each dynamic dimension). Where the model bounds a dimension (position
    embeddings cap the sequence length), torch's own suggested range is taken and the export tried again; a
    dimension the model fixes to one size, or an export that fails, is a BuildSkipped that says which and what to
    do."""
    from ..errors import BuildSkipped, first_line
    ranges: dict[str, tuple[int, int]] = {}
    for _ in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(module, args, dynamic_shapes=dynamic_shapes(spec, ranges)), ranges
        except Exception as exc:
            text = str(exc)
            fixes = {m.group(1): m.groups()[1:] for m in _FIX.finditer(text) if m.group(1) in [BATCH, *spec.symbols]}
            static = {k: int(v[2]) for k, v in fixes.items() if v[2] is not None}
            if static:
                name, size = next(iter(static.items()))
                raise BuildSkipped(f"torch.export: the model fixes dimension {name} to {size} (its code specializes on "
                                   f"that size); export it at one size: --input with {size} in place of {name}") from exc
            new = {k: (int(v[0] or ranges.get(k, (1, DIM_MAX))[0]), int(v[1] or ranges.get(k, (1, DIM_MAX))[1]))
                   for k, v in fixes.items()}
            if not new or all(ranges.get(k) == r for k, r in new.items()):
                guard = next((line.strip(" -") for line in text.splitlines() if "satisfy the generated guard" in line), "")
                raise BuildSkipped(f"torch.export failed: {first_line(exc, 240)}" + (f" ({guard[:200]})" if guard else "")
                                   + "; give a narrower size range with --dim, or export the model yourself and pass the .pt2") from exc
            ranges.update(new)
    raise BuildSkipped(f"torch.export could not settle the dimensions' ranges (last tried {ranges})")


def example_args(model, batch: int = 2, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    feeds = model.spec.sample(batch, model.dims, seed=seed)
    if model.eval_data is not None and seed == 0:
        n = len(next(iter(model.eval_data.values())))
        if n >= batch:
            feeds = {k: v[:batch] for k, v in model.eval_data.items()}
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in model.spec.input_names)


def cast_args(args, precision: str):
    dt = PRECISIONS[precision]
    return tuple(a.to(dt) if a.is_floating_point() else a for a in args)


def set_threads(ctx: LoadContext) -> None:
    if ctx.threads:
        torch.set_num_threads(int(ctx.threads))


class TorchRunner:
    """Runs a callable that takes tensors in spec order and returns a tensor sequence."""

    def __init__(self, fn, spec: IOSpec, device: str = "cpu", precision: str = "fp32", grad: bool = False):
        self.fn, self.spec, self.device, self.precision, self.grad = fn, spec, device, precision, grad
        self.names_in, self.names_out = spec.input_names, spec.output_names

    def __call__(self, feeds):
        args = cast_args(tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.names_in),
                         self.precision)
        if self.grad:
            out = self.fn(*args)
        else:
            with torch.inference_mode():
                out = self.fn(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: (t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach()).cpu().numpy()
                for n, t in zip(self.names_out, out)}


def needs_module(model) -> None:
    if model.module is None:
        raise BuildSkipped("the source is an ONNX file: only ONNX Runtime can run it")


def needs_arch(model):
    needs_module(model)
    if model.arch is None:
        raise BuildSkipped("the model has no importable architecture to rebuild it from; pass it as package.module:attr")
    return model.arch


WEIGHTS = "weights.safetensors"


def save_weights(model, workdir: Path) -> str:
    from safetensors.torch import save_model
    save_model(model.module, str(workdir / WEIGHTS))
    return WEIGHTS


def load_weights_module(artifact, root: Path, ctx: LoadContext):
    """The architecture rebuilt (imported only with consent, where it is the user's code) with the artifact's weights."""
    from safetensors.torch import load_model

    from ..modules import rebuild
    module = rebuild(artifact.architecture, trust_code=ctx.trust_code)
    load_model(module, str(root / artifact.files[0]))
    return module.eval()
