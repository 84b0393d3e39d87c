"""Helpers shared by the runtimes that run on torch (eager, TorchScript, compile, AOTInductor)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import BuildSkipped
from ..spec import BATCH, IOSpec
from .base import LoadContext

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dynamic_shapes(spec: IOSpec, max_batch: int = 4096) -> tuple[tuple[dict, ...]]:
    """torch.export dynamic shapes for a normalized ``forward(*inputs)``: one Dim per symbol, shared across inputs."""
    syms = {BATCH: torch.export.Dim(BATCH, min=1, max=max_batch)}
    for s in spec.symbols:
        syms[s] = torch.export.Dim(s, min=1, max=512 if s == "seq" else 4096)
    return (tuple({i: syms[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs),)


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
