"""Eager PyTorch: eval() + inference_mode (and, as a reference row, the model run as too often written); its own int8
with accuracy control (torch.ao dynamic int8, the Linear layers the budget cannot afford left in fp32)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..errors import BuildSkipped
from ._torch import PRECISIONS, TorchRunner, load_weights_module, needs_arch, save_weights, set_threads
from .base import Artifact, register
from .control import Control, layout, least_in_float, measures

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import BuildOptions, LoadContext, Runner, Source


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    arch = needs_arch(model)
    if options.quantize == "dynamic_int8_mixed":
        options = _mixed(model, options)
    return Artifact("eager", (save_weights(model, workdir),), options, architecture=arch)


class _Control(Control):
    """``control.Control`` for a torch module on the CPU."""

    def compiled(self, module, precision: str):
        runner = TorchRunner(module.eval(), self.spec, "cpu", precision)
        return lambda inputs: next(iter(runner(dict(zip(self.names, inputs))).values()))


@contextmanager
def _in_float(quantized, name: str, linear):
    """``quantized`` with its layer ``name`` put back as the float ``linear`` for a while."""
    parent, _, leaf = name.rpartition(".")
    owner = quantized.get_submodule(parent)
    was = getattr(owner, leaf)
    setattr(owner, leaf, linear)
    try:
        yield quantized
    finally:
        setattr(owner, leaf, was)


def _mixed(model, options: BuildOptions) -> BuildOptions:
    """torch.ao dynamic int8 with accuracy control: where int8 on every Linear layer keeps less than the budget's floors
    (with ``control.MIXED_MARGIN`` spare) on the calibration data or on raw input, the layers whose int8 costs the most
    stay in fp32, as few as hold the floors. A layer's cost: the room gained by putting it alone back in fp32 (dynamic
    int8 quantizes each layer on its own, so one quantized model serves every measurement). The layout is an at-load
    transform (``DynamicInt8(float_layers)``): the bundle keeps the fp32 weights, and its load quantizes the rest."""
    from torch import nn

    from ..transforms import DynamicInt8, apply, to_dict
    linears = {n: m for n, m in model.module.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise BuildSkipped("int8-mixed: dynamic int8 quantizes nn.Linear layers, and this model has none")
    control = _Control(model.module, model, options, "fp32")
    full = apply(model.module, DynamicInt8())
    full_kept = control.kept(full)
    if control.room(full_kept) >= 0:
        raise BuildSkipped(f"int8-mixed: torch.ao dynamic int8 keeps the floors by itself ({measures(full_kept)}): "
                           "that model is eager+int8")
    base = control.room(control.on_ranking(full, full_kept))
    cost = {}
    for name, linear in linears.items():
        with _in_float(full, name, linear) as one:
            cost[name] = control.room(control.kept(one, ranking=True)) - base
    order = sorted(linears, key=lambda n: -cost[n])
    total = sum(m.weight.numel() for m in linears.values())
    tried: dict[int, dict[str, float]] = {}  # k in fp32 -> what it kept

    def holds(k: int) -> bool:
        if k not in tried:
            tried[k] = control.kept(apply(model.module, DynamicInt8(tuple(order[:k]))))
        return control.room(tried[k]) >= 0
    hi = least_in_float(order, {n: linears[n].weight.numel() / total for n in order}, "fp32", holds, control,
                        full_kept, "int8-mixed")
    config = DynamicInt8(tuple(sorted(order[:hi])))
    parts = [n.split(".") for n in order]
    common = next((i for i, p in enumerate(zip(*parts)) if len(set(p)) > 1), min(map(len, parts)) - 1)
    return options.found(transforms=(*options.transforms, to_dict(config)),  # names without the prefix all share
                         layout=layout(order, hi, "fp32", tried[hi], "Linear layers", names=lambda ns: ", ".join(
                             ".".join(n.split(".")[common:]) for n in ns)))


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
