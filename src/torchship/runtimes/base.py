"""The runtime protocol: ``build(model, options, workdir) -> Artifact`` and ``load(artifact, root, spec, device) -> Runner``.

A Runner maps ``{name: array}`` to ``{name: array}`` for a whole batch and nothing else.
Each runtime module calls ``register(name, build, load)``; ``get(name)`` finds one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from ..errors import BuildSkipped, UsageError
from ..spec import BATCH, IOSpec


class Runner(Protocol):
    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Artifact:
    """Files on disk (relative to a root directory) and the options needed to load them."""

    runtime: str
    files: tuple[str, ...]
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "files": list(self.files), "options": self.options}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Artifact":
        return cls(d["runtime"], tuple(d["files"]), dict(d.get("options", {})))


@dataclass(frozen=True)
class Runtime:
    name: str
    build: Callable  # (model, options: dict, workdir: Path) -> Artifact
    load: Callable  # (artifact, root: Path, spec: IOSpec, device: str) -> Runner
    exact: bool = True  # fp32 numerics: held to the exact budget


_REGISTRY: dict[str, Runtime] = {}


def register(name: str, build: Callable, load: Callable, *, exact: bool = True) -> None:
    _REGISTRY[name] = Runtime(name, build, load, exact)


def get(name: str) -> Runtime:
    from . import _load_all
    _load_all()
    if name not in _REGISTRY:
        raise UsageError(f"unknown runtime {name!r}; registered runtimes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names() -> list[str]:
    from . import _load_all
    _load_all()
    return list(_REGISTRY)


# --- helpers shared by the torch-based runtimes ---------------------------------------------------

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


def needs_arch(model) -> dict:
    if model.arch is None:
        raise BuildSkipped("the model has no importable architecture to rebuild it from; pass it as package.module:attr")
    if model.module is None:
        raise BuildSkipped("the source is an ONNX file: only ONNX Runtime can run it")
    return model.arch


def save_weights(model, workdir: Path) -> tuple[str, str]:
    from safetensors.torch import save_model
    save_model(model.module, str(workdir / "weights.safetensors"))
    (workdir / "architecture.json").write_text(json.dumps(model.arch))
    return "weights.safetensors", "architecture.json"


def load_weights_module(root: Path):
    from safetensors.torch import load_model

    from ..sources import rebuild
    module = rebuild(json.loads((root / "architecture.json").read_text()), root)
    load_model(module, str(root / "weights.safetensors"))
    return module.eval()


def calibration_batches(model, items: int = 128, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Representative inputs for static int8: the source's calibration data, else the verification inputs."""
    data = model.calibration_data or model.eval_data
    if not data:
        raise BuildSkipped("static int8 needs calibration inputs, and this model has none")
    n = min(items, len(next(iter(data.values()))))
    return [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in data.items()} for i in range(0, n, batch)]
