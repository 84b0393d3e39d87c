"""Forward hooks on every leaf module, removed afterwards without a trace.

    with torchship.watch(model) as w:
        model(x)
    w.layers          # per leaf module: shapes, dtypes, params, FLOPs estimate, time, activation stats
    w.first_nonfinite # the first module whose output held NaN or Inf, with its input statistics
"""
from __future__ import annotations

import fnmatch
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import UsageError


def stats(t: torch.Tensor) -> dict:
    if not t.is_floating_point():
        t = t.float()
    t = t.detach()
    finite = torch.isfinite(t)
    f = t[finite]
    return {"min": float(f.min()) if f.numel() else None, "max": float(f.max()) if f.numel() else None,
            "mean": float(f.mean()) if f.numel() else None, "std": float(f.std()) if f.numel() > 1 else 0.0,
            "zeros": float((t == 0).float().mean()) if t.numel() else 0.0,
            "nonfinite": int((~finite).sum())}


def flops(module: nn.Module, inputs, output: torch.Tensor) -> int:
    """A multiply-add estimate (x2) for the common layers; element count for the rest."""
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        k = int(torch.tensor(module.kernel_size).prod())
        return 2 * output.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.MultiheadAttention):
        return 4 * output.numel() * module.embed_dim
    return output.numel()


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict) or hasattr(x, "values"):
        return [t for item in x.values() for t in _tensors(item)]
    return []


@dataclass
class Layer:
    name: str
    type: str
    params: int
    shapes: list
    dtypes: list
    flops: int
    ms: float
    stats: dict
    calls: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Watch:
    layers: dict[str, Layer] = field(default_factory=dict)
    first_nonfinite: dict | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    current: str | None = None  # the module running when the model raised

    def to_dict(self) -> dict:
        return {"layers": [l.to_dict() for l in self.layers.values()], "first_nonfinite": self.first_nonfinite}


@contextmanager
def watch(model: nn.Module, *, include: str | None = None, keep_activations: bool = False, with_stats: bool = True):
    """Hook every leaf module (or those whose name matches the glob ``include``); always unhooked on exit.
    ``with_stats=False``: each layer's shapes, FLOPs and time only, no activation statistics and no look for NaN or
    Inf (they pass over every output several times: MiniLM at 32 x 128 ran 4.5x slower under them).

    TorchScript modules take no hooks and are left out."""
    hookable = [(n, m) for n, m in model.named_modules() if not isinstance(m, torch.jit.ScriptModule)]
    leaves = [(n, m) for n, m in hookable if n and not any(True for _ in m.children())]
    if not leaves and hookable:
        leaves = [(n or type(m).__name__, m) for n, m in hookable[:1]]
    if include:
        leaves = [(n, m) for n, m in leaves if fnmatch.fnmatch(n, include)]
        if not leaves:
            raise UsageError(f"no module name matches {include!r}; names look like {[n for n, _ in model.named_modules() if n][:5]}")
    w = Watch()
    started: dict[str, float] = {}
    handles = []

    def pre(name):
        def hook(module, args):
            w.current = name
            started[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(module, args, output):
            ms = (time.perf_counter() - started.pop(name, time.perf_counter())) * 1e3
            outs = _tensors(output)
            if not outs:
                return
            s = stats(outs[0]) if with_stats else {}
            if name in w.layers:
                layer = w.layers[name]
                layer.calls += 1
                layer.ms += ms
            else:
                w.layers[name] = Layer(name, type(module).__name__, sum(p.numel() for p in module.parameters(recurse=False)),
                                       [list(o.shape) for o in outs], [str(o.dtype).removeprefix("torch.") for o in outs],
                                       sum(flops(module, args, o) for o in outs), ms, s)
            if with_stats and w.first_nonfinite is None and any(not torch.isfinite(o).all() for o in outs if o.is_floating_point()):
                w.first_nonfinite = {"module": name, "type": type(module).__name__, "output": s,
                                     "inputs": [stats(t) for t in _tensors(args)]}
            if keep_activations:
                w.activations[name] = outs[0].detach().cpu().contiguous()
            w.current = None
        return hook

    try:
        for name, m in leaves:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        yield w
    finally:
        for h in handles:
            h.remove()
