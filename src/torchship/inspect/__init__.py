"""See inside a forward pass of any source: ``inspect`` runs one under the hooks of ``torchship.hooks``.

    with torchship.inspect.watch(model) as w:
        model(x)
    w.layers          # per leaf module: shapes, dtypes, params, FLOPs estimate, time, activation stats
    w.first_nonfinite # the first module whose output held NaN or Inf, with its input statistics
"""
from __future__ import annotations

import torch

from ..errors import ModelError, UsageError, first_line
from ..hooks import Layer, Watch, watch

__all__ = ["Layer", "Watch", "inspect", "watch"]


def inspect(source, inputs: list[str] | None = None, *, weights: str | None = None, dims: dict | None = None,
            batch: int = 2, include: str | None = None, dump: str | None = None) -> Watch:
    """Run one forward pass of ``source`` under ``watch``; with ``dump``, save activations as safetensors."""
    from pathlib import Path

    from ..modules import inner, to_torch
    from ..sources import load_source
    if dump is not None:
        _check_dir(Path(dump))
    model = load_source(source, inputs, weights=weights, dims=dims)
    if model.module is None or isinstance(getattr(model.module, "module", None), torch.jit.ScriptModule):
        raise UsageError("inspect needs an eager PyTorch module: ONNX and TorchScript files take no forward hooks")
    feeds = ({k: v[:batch] for k, v in model.eval_data.items()} if model.eval_data is not None
             else model.spec.sample(batch, model.dims))
    module = model.module.eval()
    args = to_torch(feeds, model.spec.input_names)
    try:
        with torch.inference_mode():
            module(*args)  # warm-up, so the timed pass below measures steady state
    except Exception:
        pass  # the hooked pass below names the module that raises
    with watch(inner(module), include=include, keep_activations=dump is not None) as w:
        try:
            with torch.inference_mode():
                module(*args)
        except Exception as exc:
            where = f" in module {w.current!r}" if w.current else ""
            raise ModelError(f"the model raised{where}: {first_line(exc)}") from exc
    if dump is not None:
        _dump(w.activations, Path(dump))
    return w


def _check_dir(path) -> None:
    import os
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use {path} for --dump: {exc.strerror}; choose a writable directory") from exc
    if not os.access(path, os.W_OK):
        raise UsageError(f"cannot write to {path} for --dump; choose a writable directory")


def _dump(activations: dict, path) -> None:
    import os

    from safetensors.torch import save_file
    tmp = path / ".activations.safetensors.tmp"
    try:
        save_file(activations, str(tmp))
        os.replace(tmp, path / "activations.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
