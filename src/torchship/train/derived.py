"""Variants that need training data: derived from the model through the trainer, then built like any other source.

``qat``: quantization-aware fine-tuning to int8 (torchao PT2E); ``channelsNN``: NN% of channels removed
(Torch-Pruning) and fine-tuned back; ``student``: a smaller model distilled from this one. Each becomes a
torch.export program (``.pt2``) with the original's input and output names, so the AOTInductor and ONNX Runtime
variants build from it, and each is verified against the original fp32 model on the same held-out inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import BuildSkipped
from ..runtimes.base import DESCRIPTORS

CHANNEL_LEVELS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class Trained:
    """A kind of variant trained from the model, as the plan builds it: ``{runtime}+{label}`` on each runtime that
    builds from an exported program, one per level (gentle to aggressive, a ladder where there are several)."""

    kind: str  # the --transforms word
    label: str  # the variant's name after the runtime ({pct}: the level in percent)
    note: str
    levels: tuple[float | None, ...] = (None,)


TRAINED = (
    Trained("qat", "qat-int8", "quantization-aware fine-tuning to int8 (torchao PT2E, x86 inductor quantizer)"),
    Trained("channels", "channels{pct}", "{pct}% of channels removed (Torch-Pruning), then fine-tuned", CHANNEL_LEVELS),
    Trained("distill", "student", "a smaller student distilled from this model"),
)
# the runtimes that build from an exported program (their descriptors say so; eager and TorchScript need an architecture)
RUNTIMES = tuple(name for name, d in DESCRIPTORS.items() if "program" in d.takes)
STUDENTS = {"digits-cnn": "torchship.zoo.digits:student"}  # the zoo's own smaller architectures, by zoo name


def defaults(kind: str, task: str):
    """The fine-tuning recipe per kind (the model starts trained, except a student)."""
    from .fit import TrainConfig
    base = TrainConfig(task=task if task in ("classify", "embed") else "regress", progress=False, patience=None)
    return {"qat": replace(base, epochs=3, lr=1e-4), "channels": replace(base, epochs=8, lr=1e-3),
            "distill": replace(base, epochs=15, lr=3e-3, patience=3)}[kind]


def derive(model, kind: str, level: float | None, data, workdir: Path, *, student=None,
           epochs: int | None = None) -> tuple[Path, dict]:
    """Train the derived model of ``kind`` and export it into ``workdir``; returns (program path, what training did)."""
    from ..modules import inner
    from . import train
    from .qat import export_program, save_program
    if model.module is None:
        raise BuildSkipped("an ONNX source cannot be trained here: only ONNX Runtime can run it")
    if len(model.spec.inputs) != 1:
        raise BuildSkipped(f"training takes one input tensor (x, y pairs), and this model has {len(model.spec.inputs)}")
    config = defaults(kind, model.task)
    config = replace(config, epochs=epochs or config.epochs, qat=kind == "qat",
                     prune_channels=level if kind == "channels" else None)
    if kind == "distill":
        zoo = model.arch.ref if model.arch is not None and model.arch.kind == "zoo" else None
        student = student or STUDENTS.get(zoo)
        if student is None:
            raise BuildSkipped("distillation needs a smaller architecture: pass --student package.module:attr")
        run = train(student, data, config, teacher=model.module)
    else:
        run = train(model.module, data, config)
    name = model.spec.input_names[0]
    example = torch.from_numpy(model.spec.sample(2, model.dims, seed=0)[name])
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "model.pt2"
    if kind == "qat":
        from . import qat
        qat.save(run.model, example, path)
    else:
        save_program(export_program(inner(run.model).eval(), example), path)
    s = run.summary
    from ..results import Training
    return path, Training(s["epochs_run"], s["seconds"], s["val"], s.get("test", {}), s.get("parameters_before"),
                          s.get("parameters_after"))
