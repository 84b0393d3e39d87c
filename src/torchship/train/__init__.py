"""torchship train: PyTorch Lightning with the production recipe, distillation and multi-process runs.

    result = torchship.train.train("mypkg:Net", "data.npz", TrainConfig(epochs=10), out="run")
    # run/model.safetensors (best checkpoint's weights), run/metrics.csv, run/summary.json
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .fit import SCHEDULES, TASKS, TrainConfig, TrainResult, choose_precision, fit

__all__ = ["SCHEDULES", "TASKS", "TrainConfig", "TrainResult", "choose_precision", "fit", "train"]


def train(source: Any, data: Any, config: TrainConfig | None = None, *, out: str | Path | None = None,
          teacher: Any = None, weights: str | None = None) -> TrainResult:
    """Train ``source`` (an nn.Module, ``package.module:attr`` or zoo:digits-cnn) on ``data``; see the module docstring.
    ``teacher``: distil from it (an nn.Module, ``package.module:attr`` or zoo:digits-cnn, the trained one)."""
    config = config or TrainConfig()
    import lightning as L
    L.seed_everything(config.seed, workers=True, verbose=False)  # before the module is built: its initial weights too
    model = _module(source, weights=weights)
    if (config.qat or config.prune_channels) and source == "zoo:digits-cnn" and not weights:  # fine-tune the trained model
        from .pretrained import digits_cnn
        model = digits_cnn()
    if isinstance(teacher, str) and teacher == "zoo:digits-cnn":  # the trained one, not a fresh architecture
        from .pretrained import digits_cnn
        teacher = digits_cnn()
    elif teacher is not None:
        teacher = _module(teacher)
    return fit(model, data, config, out=out, teacher=teacher)


def _module(source, weights=None) -> torch.nn.Module:
    """``source`` as a module to train: an nn.Module, ``zoo:digits-cnn`` (a fresh architecture) or
    ``package.module:attr``; ``weights`` in the architecture's own keys, as train writes them."""
    from ..arch import Architecture
    from ..modules import import_attr, inner, instantiate, load_weights, rebuild
    if isinstance(source, torch.nn.Module):
        return source
    text = str(source)
    if text == "zoo:digits-cnn":
        from ..zoo.digits import SPEC
        module = rebuild(Architecture("zoo", tuple(SPEC.input_names), "digits-cnn"))
    else:
        module = instantiate(import_attr(text), text)
    if weights:
        inner(module).load_state_dict(load_weights(weights))
    return module
