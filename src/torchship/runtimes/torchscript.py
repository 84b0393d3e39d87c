"""TorchScript: trace, check the trace against eager on other inputs, fall back to script; freeze."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..errors import BuildSkipped
from ._torch import TorchRunner, example_args, needs_module, set_threads
from .base import Artifact, register

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import BuildOptions, LoadContext, Runner, Source


def check_inputs(model) -> list[tuple[torch.Tensor, ...]]:
    """Inputs unlike the trace example: other values, negated values, other batch and symbol sizes."""
    spec, out = model.spec, []
    for seed, batch, shrink in ((1, 3, 3), (2, 1, 5), (3, 4, 0)):  # smaller sizes: the model may allow no more
        dims = {s: n - shrink if n > shrink + 1 else n + 1 for s, n in model.dims.items()}
        feeds = spec.sample(batch, dims, seed=seed)
        if seed == 2:
            feeds = {k: -v if v.dtype.kind == "f" else v for k, v in feeds.items()}
        out.append(tuple(torch.from_numpy(feeds[n]) for n in spec.input_names))
    return out


def disagreement(fn, module, inputs) -> str | None:
    """Describe the first input on which ``fn`` and eager ``module`` disagree, or None."""
    with torch.inference_mode():
        for args in inputs:
            want = module(*args)
            try:
                got = fn(*args)
            except Exception as exc:
                return f"fails on input of shape {[tuple(a.shape) for a in args]}: {str(exc).splitlines()[0][:200]}"
            got = (got,) if isinstance(got, torch.Tensor) else got
            for w, g in zip(want, got):
                if w.shape != g.shape or not torch.allclose(w.float(), g.float(), rtol=1e-3, atol=1e-4 * (1 + w.float().abs().max())):
                    diff = "shape" if w.shape != g.shape else f"max abs diff {(w.float() - g.float()).abs().max().item():.3g}"
                    return f"disagrees with eager on input of shape {[tuple(a.shape) for a in args]} ({diff})"
    return None


def _optimize(frozen):
    """optimize_for_inference's prepacked ops do not serialize: it runs at load, on the saved frozen module."""
    try:
        return torch.jit.optimize_for_inference(frozen)
    except Exception:  # optional pass; the frozen module is still correct
        return frozen


def _script(module, model):
    """Script the user's module; a trace of the thin normalizing wrapper keeps the scripted control flow."""
    from ..modules import Normalized
    inner = module.module if isinstance(module, Normalized) else module
    wrapper = Normalized(torch.jit.script(inner), module.input_names, module.keys, module.by_keyword).eval()
    return torch.jit.trace(wrapper, example_args(model), check_trace=False, strict=False)


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    needs_module(model)
    module, checks = model.module.eval(), check_inputs(model)
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mode, scripted = None, None
        try:
            if options.script:  # the model branches on its values: a trace would keep one path
                notes.append("scripted: the model branches on its values (data-dependent control flow), which a trace "
                             "would fix to one path")
            else:
                traced = torch.jit.trace(module, example_args(model), check_trace=False, strict=False)
                problem = disagreement(traced, module, checks)
                if problem:
                    notes.append(f"trace {problem}: data-dependent control flow")
                else:
                    mode, scripted = "trace", traced
        except Exception as exc:
            notes.append(f"trace failed: {str(exc).strip().splitlines()[0][:200]}")
        if scripted is None:
            try:
                mode, scripted = "script", _script(module, model)
            except Exception as exc:
                notes.append(f"script failed: {str(exc).strip().splitlines()[0][:200]}")
                raise BuildSkipped("; ".join(notes)) from exc
        frozen = torch.jit.freeze(scripted.eval())
        problem = disagreement(_optimize(torch.jit.freeze(scripted.eval())), module, checks)
        if problem:
            raise BuildSkipped("; ".join(notes + [f"{mode} {problem}"]))
        torch.jit.save(frozen, str(workdir / "model.ts.pt"))
    return Artifact("torchscript", ("model.ts.pt",), options.found(mode=mode, notes=tuple(notes)))


def load(artifact: Artifact, root: Path, spec: IOSpec, ctx: LoadContext) -> Runner:
    set_threads(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = _optimize(torch.jit.load(str(root / artifact.files[0]), map_location=ctx.device))
    return TorchRunner(module, spec, ctx.device)


register("torchscript", build, load)
