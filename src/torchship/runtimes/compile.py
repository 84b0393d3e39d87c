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
    return TorchRunner(compiled, spec, ctx.device, opts.precision)


register("compile", build, load)
