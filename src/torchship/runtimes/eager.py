"""Eager PyTorch: eval() + inference_mode (and, as a reference row, the model run as too often written)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._torch import PRECISIONS, TorchRunner, load_weights_module, needs_arch, save_weights, set_threads
from .base import Artifact, register

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import BuildOptions, LoadContext, Runner, Source


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    arch = needs_arch(model)
    return Artifact("eager", (save_weights(model, workdir),), options, architecture=arch)


def prepare(module, options, device):
    """Put a rebuilt module on its device and precision; cudnn.benchmark for fixed shapes on CUDA."""
    module = module.to(device)
    if options.precision != "fp32":
        module = module.to(PRECISIONS[options.precision])
    if device.startswith("cuda") and options.fixed_shapes:
        torch.backends.cudnn.benchmark = True
    return module


def rebuild(artifact, root, ctx):
    """The module from the artifact's fp32 weights, with its at-load transforms applied again (they are
    deterministic functions of those weights)."""
    from ..transforms import apply, from_dict
    module = load_weights_module(artifact, root, ctx)
    for t in artifact.options.transforms:
        module = apply(module, from_dict(t))
    return module


def load(artifact: Artifact, root: Path, spec: IOSpec, ctx: LoadContext) -> Runner:
    set_threads(ctx)
    opts = artifact.options
    module = prepare(rebuild(artifact, root, ctx), opts, ctx.device)
    if opts.naive:  # as too often written: training mode, autograd on
        return TorchRunner(module.train(), spec, ctx.device, grad=True)
    return TorchRunner(module.eval(), spec, ctx.device, opts.precision)


register("eager", build, load)
