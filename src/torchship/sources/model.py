"""The record every source becomes: a normalized module, its IOSpec, and what verification can use."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..arch import Architecture
from ..errors import SourceError, SpecError
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
    converted: Path | None = None  # the plain variant's conversion, for the runtime being built (runtimes.base.Source)
    file: Path | None = None  # the .pt2 or TorchScript file the module was loaded from
    tokenizer: Any = None  # a transformers tokenizer (text models): its tokenizer.json goes into the bundle
    text_length: int | None = None  # the tokens a text is truncated to (sentence-transformers' max_seq_length, ...)
    text_reference: Path | None = None  # a sentence-transformers directory: its encode() is the pipeline to match
    texts: tuple[str, ...] | None = None  # held-out raw text, where the source has some (its pipeline is checked on it)
    image_processor: Any = None  # a transformers image processor (vision models): its steps go into the bundle
    class_names: tuple[str, ...] | None = None  # a classifier's labels by class index (id2label)
    branches: tuple = ()  # flow.Branch: where the forward branches on its values (found once, before any build)
    branches_unknown: str | None = None  # why they could not be looked for, where they could not
    was_training: bool = False  # the module as given was in training mode (torchship runs it in eval mode)
    calibration_data: dict[str, np.ndarray] | None = None
    # raw input through the bundle's pipeline (one batch of the hard cases: empty, one word, other scripts, too long),
    # where the model takes some: what int8 with accuracy control also holds, item by item (``optimize.raw.cases``)
    raw_data: dict[str, np.ndarray] | None = None


def keys_of(module: Normalized) -> tuple[str, ...] | None:
    return tuple(module.keys) if module.keys else None


def _example(spec: IOSpec, dims: Mapping[str, int], example, int_high: int) -> dict[str, np.ndarray]:
    """Two items to run the model on: the user's data where it fits the spec, else generated within the ranges."""
    if example:
        try:
            feeds = {n: np.ascontiguousarray(np.asarray(example[n])[:2]) for n in spec.input_names}
            spec.check(feeds)
            return feeds
        except (KeyError, IndexError, ValueError, SpecError):  # data that does not fit: generated inputs instead
            pass
    return spec.sample(2, dims, int_high=int_high)


def finish(name: str, module: nn.Module, spec: IOSpec, dims: Mapping[str, int], *, task: str | None = None,
           outputs: list[str] | None = None, weights: str | None = None, by_keyword: bool = False,
           kwargs: Mapping | None = None, example: Mapping[str, np.ndarray] | None = None, **kw) -> Model:
    """Normalize ``module``, check it runs on the spec, infer its outputs, integer ranges and task. ``kwargs``: fixed
    keyword arguments of every call (``use_cache=False``); ``example``: the user's data for the example run."""
    if weights:
        try:
            module.load_state_dict(load_weights(weights))
        except RuntimeError as exc:
            raise SourceError(f"weights in {weights} do not fit {name}: {str(exc).splitlines()[0]}") from exc
    was_training = any(m.training for m in module.modules())
    module = module.eval()
    dims = {s: int(dims.get(s, 16)) for s in spec.symbols}
    from ..hooks import watch
    rows = [m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)]
    args = to_torch(_example(spec, dims, example, min(rows + [100])), spec.input_names)  # ids valid for every table
    looked_up: dict[int, int] = {}  # id of the tensor an embedding was given -> its rows

    def lookup(m, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            looked_up[id(inputs[0])] = min(looked_up.get(id(inputs[0]), m.num_embeddings), m.num_embeddings)
    hooks = [m.register_forward_pre_hook(lookup) for m in module.modules() if isinstance(m, nn.Embedding)]
    extra = dict(kwargs or {})
    failed: SourceError | None = None

    def call():
        with torch.inference_mode():
            return module(**dict(zip(spec.input_names, args)), **extra) if by_keyword else module(*args, **extra)
    try:
        with watch(module, with_stats=False) as w:  # which module failed, if one does
            try:
                raw = call()
            except Exception as exc:
                where = f"in module {w.current!r}: " if w.current else ""
                failed = SourceError(f"{name} fails on an example input {' '.join(map(str, spec.inputs))}: {where}"
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                failed.__cause__ = exc
                raw = None
    finally:
        for h in hooks:
            h.remove()
    if failed is not None:  # hooks can be what fails (torch.cond compiles its branches, and a hook inside is not traceable)
        try:
            raw = call()
        except Exception:
            raise failed from failed.__cause__
    spec = IOSpec(tuple(replace(t, range=(0, looked_up[id(a)])) if t.range is None and id(a) in looked_up else t
                        for t, a in zip(spec.inputs, args)), spec.outputs)
    norm = Normalized(module, spec.input_names, output_keys(raw), by_keyword, kwargs).eval()
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
    """Run the module at two sizes and name each output axis (batch, a symbol, an int, or a symbol of its own where its
    length follows an input's some other way: audio frames from samples; outputs whose axes follow alike share it).
    The sizes lie far enough apart that a strided length changes too."""
    def other(d: int) -> int:  # below the size given (the model may allow no more), far enough for a strided length
        return d - max(1, d // 3) if d > 3 else d + 1
    sizes = [(2, {s: dims.get(s, 8) for s in spec.symbols}), (3, {s: other(dims.get(s, 8)) for s in spec.symbols})]
    shapes = []
    with torch.inference_mode():
        for batch, d in sizes:
            try:
                outs = module(*to_torch(spec.sample(batch, d), spec.input_names))
            except Exception as exc:  # as the first run: one line naming what it was given, and the likely fix
                given = ", ".join(f"{k}={v}" for k, v in {"batch": batch, **d}.items())
                ints = [t.name for t in spec.inputs if t.dtype.startswith("int") and not t.tied]
                hint = (f"; if the values of {ints} depend on a dimension (lengths, counts, positions), give their range "
                        "as e.g. lengths:int64[batch]{1:seq+1}" if ints and spec.symbols else "")
                raise SourceError(f"the model fails when run at {given} (to name its outputs' dimensions) on "
                                  f"{' '.join(map(str, spec.inputs))}: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}") from exc
            shapes.append([tuple(o.shape) for o in outs])
            dtypes = [str(o.dtype).removeprefix("torch.") for o in outs]
    names = list(names) if names else (["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
    if len(names) != len(outs):
        raise SourceError(f"model returns {len(outs)} outputs, but {len(names)} output names were given")
    specs, derived = [], {}  # (length at the two sizes) -> the symbol of an axis that follows an input's some other way
    for name, dt, s0, s1 in zip(names, dtypes, *shapes):
        axes = []
        for i, (a, b) in enumerate(zip(s0, s1)):
            if a == b:
                axes.append(a)
            elif (a, b) == (sizes[0][0], sizes[1][0]):
                axes.append(BATCH)
            else:
                match = [s for s in spec.symbols if (sizes[0][1][s], sizes[1][1][s]) == (a, b)]
                axes.append(match[0] if match else derived.setdefault((a, b), f"{name}_dim{i}"))
        specs.append(TensorSpec(name, dt if dt in ("float32", "float16", "float64", "int64", "int32", "bool") else "float32",
                                tuple(axes)))
    return tuple(specs)
