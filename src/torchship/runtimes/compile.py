"""torch.compile (inductor): rebuilt from weights at load time; the compile is part of the cold start."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._torch import TorchRunner, set_threads
from .base import register
from .eager import build as eager_build
from .eager import prepare, rebuild

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import Artifact, BuildOptions, LoadContext, Runner, Source


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    from msgspec.structs import replace
    return replace(eager_build(model, options, workdir), runtime="compile")


def load(artifact: Artifact, root: Path, spec: IOSpec, ctx: LoadContext) -> Runner:
    set_threads(ctx)
    opts = artifact.options
    # freezing: weights become constants that inductor folds and prepacks (and int8 patterns lower to int8 kernels);
    # given to this compile only (as its options, with the default mode's own), not set for the whole process
    from torch._inductor import list_mode_options
    options = {**list_mode_options("default"), "freezing": True}
    module = prepare(rebuild(artifact, root, ctx), opts, ctx.device).eval()
    compiled = torch.compile(module, options=options)
    return TorchRunner(compiled if opts.fixed_shapes else symbolic(compiled, spec), spec, ctx.device, opts.precision)


def symbolic(compiled, spec: IOSpec):
    """``compiled`` called with the dimensions the spec names (batch, seq, ...) marked dynamic up front: one graph for
    every size of them (and one for a batch of one, which torch specializes), not a graph for the first size, another
    once a second size makes torch mark it dynamic, and more for each other dimension that varies. MiniLM in bf16 at
    nine shapes: 2 compiles against 4, at the same speed (benchmarks/compile_shapes.py)."""
    dims = [tuple(i for i, d in enumerate(t.shape) if isinstance(d, str)) for t in spec.inputs]

    def run(*args):
        for tensor, named in zip(args, dims):
            for i in named:
                if tensor.shape[i] > 1:  # a size of one is specialized by torch whatever is asked
                    torch._dynamo.maybe_mark_dynamic(tensor, i)
        return compiled(*args)
    return run


register("compile", build, load)
