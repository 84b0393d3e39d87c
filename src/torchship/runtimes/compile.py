"""torch.compile (inductor): rebuilt from weights at load time; the compile is part of the cold start."""
from __future__ import annotations

import torch

from .base import TorchRunner, register
from .eager import build as eager_build
from .eager import prepare, rebuild


def build(model, options, workdir):
    from .base import Artifact
    art = eager_build(model, options, workdir)
    return Artifact("compile", art.files, dict(options))


def load(artifact, root, spec, device="cpu"):
    opts = artifact.options
    # freezing: weights become constants that inductor folds and prepacks (and int8 patterns lower to int8 kernels)
    torch._inductor.config.freezing = opts.get("freezing", True)
    module = prepare(rebuild(root, opts), opts, device).eval()
    compiled = torch.compile(module, mode=opts.get("mode", "default"), dynamic=opts.get("dynamic"))
    return TorchRunner(compiled, spec, device, opts.get("precision", "fp32"))


register("compile", build, load)
