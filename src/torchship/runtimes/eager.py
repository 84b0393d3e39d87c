"""Eager PyTorch: eval() + inference_mode (and, as a reference row, the model run as too often written)."""
from __future__ import annotations

import torch

from .base import PRECISIONS, TorchRunner, load_weights_module, needs_arch, register, save_weights


def build(model, options, workdir):
    from .base import Artifact
    needs_arch(model)
    return Artifact("eager", save_weights(model, workdir), dict(options))


def prepare(module, options, device):
    """Put a rebuilt module on its device and precision; cudnn.benchmark for fixed shapes on CUDA."""
    module = module.to(device)
    if options.get("precision", "fp32") != "fp32":
        module = module.to(PRECISIONS[options["precision"]])
    if device.startswith("cuda") and options.get("fixed_shapes"):
        torch.backends.cudnn.benchmark = True
    return module


def rebuild(root, opts):
    """The module from the artifact's fp32 weights, with its at-load transforms applied again (they are
    deterministic functions of those weights)."""
    from ..transforms import apply, from_dict
    module = load_weights_module(root)
    for t in opts.get("transforms", []):
        module = apply(module, from_dict(t))
    return module


def load(artifact, root, spec, device="cpu"):
    opts = artifact.options
    module = prepare(rebuild(root, opts), opts, device)
    if opts.get("naive"):  # as too often written: training mode, autograd on
        return TorchRunner(module.train(), spec, device, grad=True)
    return TorchRunner(module.eval(), spec, device, opts.get("precision", "fp32"))


register("eager", build, load)
