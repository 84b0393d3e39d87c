"""The training loop: an nn.Module, its data and a TrainConfig in, the trained module and what training did out.

Nothing here resolves a source string (``torchship.train.train`` does), so the zoo's own weights can be trained
with it.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import scratch
from ..errors import UsageError

TASKS = ("classify", "regress", "embed")
SCHEDULES = ("cosine", "step", "poly", "none")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "classify"
    epochs: int = 30  # at most; early stopping ends sooner and keeps the best epoch
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_fraction: float = 0.05
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto | 32-true | bf16-mixed | 16-mixed
    patience: int | None = 5  # early stopping on the validation metric; None: off
    augment: bool = False
    seed: int = 0
    devices: int = 1
    strategy: str = "auto"  # "ddp" for data parallel over processes (gloo on CPU)
    temperature: float = 4.0  # distillation
    alpha: float = 0.7  # distillation: weight of the soft-target loss
    qat: bool = False  # quantization-aware training: writes model_int8.pt2 (torchao PT2E, x86 inductor quantizer)
    keep_sparsity: bool = False  # fine-tuning a pruned model: weights that are zero at the start stay zero
    prune_channels: float | None = None  # structured pruning (Torch-Pruning) of this fraction of channels, then fine-tune
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise UsageError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "devices"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UsageError(f"lr must be positive and weight_decay non-negative, got {self.lr}, {self.weight_decay}")
        if self.qat and self.devices > 1:
            raise UsageError("quantization-aware training runs in one process: drop --devices/--strategy or --qat")
        if self.prune_channels is not None and not 0 < self.prune_channels < 1:
            raise UsageError(f"--prune-channels must lie strictly between 0 and 1, got {self.prune_channels}")
        if self.qat and self.keep_sparsity:
            raise UsageError("--keep-sparsity and --qat do not combine: fine-tune the pruned model first, then run QAT on it")


@dataclass
class TrainResult:
    model: torch.nn.Module
    out: Path | None
    summary: dict = field(default_factory=dict)


def choose_precision(requested: str, accelerator: str) -> tuple[str, str]:
    """(Lightning precision, why): mixed precision on a GPU; fp32 on the CPU, where bf16 autocast saved little time
    and cost accuracy (digits-cnn, 30 epochs: 97.8% in bf16-mixed against 98.9% in fp32, benchmarks/train.py)."""
    if requested != "auto":
        return requested, "as requested"
    if accelerator == "gpu":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "CUDA device supports bf16"
        return "16-mixed", "CUDA device without bf16: fp16 autocast with loss scaling"
    return "32-true", "fp32 on the CPU: bf16 autocast costs accuracy and saves little time there (--precision bf16-mixed to use it)"


def _epochs_run(csv: Path) -> int:
    import csv as csvlib
    try:
        with open(csv) as f:
            return 1 + max((int(r["epoch"]) for r in csvlib.DictReader(f) if r.get("epoch")), default=-1)
    except OSError:
        return 0


def _mask_zeros(model: torch.nn.Module) -> list:
    """Hold each Linear/Conv weight's zeros at zero while training (torch's pruning reparametrization)."""
    from torch.nn.utils import prune

    from ..transforms import PRUNABLE
    masked = [m for m in model.modules() if isinstance(m, PRUNABLE) and bool((m.weight == 0).any())]
    if not masked:
        raise UsageError("--keep-sparsity: the model has no zero weights to keep; prune it first "
                         "(torchship.transforms.apply(model, MagnitudePrune(0.5)))")
    for m in masked:
        prune.custom_from_mask(m, "weight", m.weight != 0)
    return masked


def _first_batch(datasets) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(torch.utils.data.DataLoader(datasets["train"], batch_size=min(8, len(datasets["train"])))))


def _check_fit(model, teacher, datasets, config) -> None:
    """Run one batch through the model (and teacher) before training: a clear line instead of a traceback."""
    x, y = _first_batch(datasets)
    from .module import first_output
    try:
        with torch.no_grad():
            out = first_output(model.eval(), x)
    except Exception as exc:
        raise UsageError(f"training inputs of shape {list(x.shape)} ({x.dtype}) do not fit the model: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if config.task == "classify":
        n = out.shape[-1]
        labels = torch.cat([ds.tensors[1] for ds in datasets.values() if hasattr(ds, "tensors")]) if all(
            hasattr(ds, "tensors") for ds in datasets.values()) else y
        if labels.dtype.is_floating_point:
            raise UsageError(f"classification labels must be integers, got {labels.dtype}")
        if int(labels.min()) < 0 or int(labels.max()) >= n:
            raise UsageError(f"labels run from {int(labels.min())} to {int(labels.max())}, but the model has {n} outputs "
                             f"(labels must lie in 0..{n - 1})")
    if teacher is not None:
        with torch.no_grad():
            t = first_output(teacher.eval(), x)
        if t.shape != out.shape:
            raise UsageError(f"the teacher's outputs {list(t.shape)} do not match the student's {list(out.shape)}")
    model.train()


def fit(model: torch.nn.Module, data: Any, config: TrainConfig | None = None, *, out: str | Path | None = None,
        teacher: torch.nn.Module | None = None) -> TrainResult:
    """Train ``model`` on ``data`` (see ``load_data``), distilling from ``teacher`` when given. Lightning's chatter is
    quieted for this call only: the caller's warning filters and logger levels are as they were afterwards."""
    with _quiet(teacher is not None):
        return _fit(model, data, config, out=out, teacher=teacher)


LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextmanager
def _quiet(distilling: bool):
    import logging
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    with warnings.catch_warnings():
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        if distilling:  # the teacher stays in eval mode on purpose
            warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _fit(model: torch.nn.Module, data: Any, config: TrainConfig | None, *, out: str | Path | None,
         teacher: torch.nn.Module | None) -> TrainResult:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from safetensors.torch import save_model

    from ..outdir import check_writable
    from .data import load_data
    from .module import SyncTeardown, TaskModule
    config = config or TrainConfig()
    out = Path(out) if out is not None else None
    if out is not None:
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"{out} is not empty; training never overwrites a previous run: choose another --out")
        check_writable(out, option="--out")
    L.seed_everything(config.seed, workers=True, verbose=False)
    teacher_model = teacher
    datasets = load_data(data, config.seed)
    _check_fit(model, teacher_model, datasets, config)
    example = _first_batch(datasets)[0]
    pruning = {}
    if config.prune_channels:  # shrink the layers now, recover the accuracy by training
        from ..transforms import ChannelPrune, apply
        before = sum(p.numel() for p in model.parameters())
        model = apply(model, ChannelPrune(config.prune_channels), (example,)).train()
        pruning = {"channels_pruned": config.prune_channels, "parameters_before": before,
                   "parameters_after": sum(p.numel() for p in model.parameters())}
    if config.qat:
        from . import qat
        model = qat.prepare(model, example)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision, why = choose_precision(config.precision, accelerator)
    if config.qat and config.precision == "auto":
        precision, why = "32-true", "quantization-aware training: fake quantization runs in fp32"
    # the validation loss, for classifiers too: on a small validation split accuracy plateaus within a few epochs
    # and stops a run that is still improving (digits-cnn: 97.5% stopped at epoch 10 by val_acc)
    monitor, mode = "val_loss", "min"
    masked = _mask_zeros(model) if config.keep_sparsity else []  # before the directory: a model with no zeros is refused
    held = scratch.make("train")  # removed by the next one made if this process is killed (checkpoints are a model's size)
    work = held / "run"  # what --out becomes, without the directory's lock file
    work.mkdir()
    loader = lambda split, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        datasets[split], batch_size=config.batch_size, shuffle=shuffle, num_workers=0)
    ckpt = ModelCheckpoint(dirpath=work / "checkpoints", monitor=monitor, mode=mode, save_top_k=1, save_weights_only=True)
    callbacks = [ckpt, SyncTeardown()] + ([EarlyStopping(monitor=monitor, mode=mode, patience=config.patience)]
                                           if config.patience else [])
    strategy = config.strategy
    if strategy == "ddp" and accelerator == "cpu" and config.devices > 1:
        strategy = "ddp_spawn"  # CPU processes on gloo, started from this process (works from the API and the CLI)
    trainer = L.Trainer(max_epochs=config.epochs, accelerator=accelerator, devices=config.devices, strategy=strategy,
                        precision=precision, gradient_clip_val=config.grad_clip, callbacks=callbacks,
                        logger=CSVLogger(work, name="", version=""), enable_progress_bar=config.progress,
                        enable_model_summary=False, deterministic=False,
                        log_every_n_steps=max(1, min(10, len(datasets["train"]) // config.batch_size)))
    trainable_teacher = [p for p in teacher_model.parameters() if p.requires_grad] if teacher_model is not None else []
    task = TaskModule(model, config, teacher_model)
    started = time.perf_counter()
    try:
        trainer.fit(task, loader("train", True), loader("val", False))
    except BaseException:  # a diverged or interrupted run leaves nothing behind
        scratch.remove(held)
        raise
    finally:  # the teacher was frozen for the run; hand the caller's module back as it came
        for p in trainable_teacher:
            p.requires_grad_(True)
    seconds = time.perf_counter() - started
    if ckpt.best_model_path:  # the best epoch's weights (a weights-only checkpoint this run wrote)
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
    if masked:  # the masks become permanent zeros again: plain weights for safetensors and the runtimes
        from torch.nn.utils import prune
        for m in masked:
            prune.remove(m, "weight")
    # evaluate once on one device: a distributed sampler would repeat items to even out the ranks
    evaluator = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                          enable_progress_bar=False, enable_model_summary=False)
    val = evaluator.validate(task, loader("val", False), verbose=False)[0]
    test = evaluator.test(task, loader("test", False), verbose=False)[0] if "test" in datasets else {}
    model = task.model.eval()
    from ..transforms import sparsity
    if config.qat:  # the int8 model's own figures, beside the fake-quantized ones
        model = qat.convert(model)
        int8 = TaskModule(model, config)
        val.update({f"{k}_int8": v for k, v in evaluator.validate(int8, loader("val", False), verbose=False)[0].items()})
        if "test" in datasets:
            test.update({f"{k}_int8": v for k, v in evaluator.test(int8, loader("test", False), verbose=False)[0].items()})
    epochs = _epochs_run(work / "metrics.csv")
    summary = {
        "recipe": {**{k: v for k, v in asdict(config).items() if k != "progress"}, "strategy": strategy,
                   "optimizer": "AdamW (no decay on biases and norms)", "precision": precision, "precision_reason": why,
                   "early_stopping": f"{monitor} ({mode}), patience {config.patience}" if config.patience else "off",
                   "distillation": teacher is not None,
                   "qat": "torchao PT2E, x86 inductor quantizer (int8)" if config.qat else "off"},
        **({"sparsity": round(sparsity(model), 4)} if config.keep_sparsity else {}), **pruning,
        "epochs_run": epochs, "seconds": round(seconds, 2),
        "val": {k: float(v) for k, v in val.items()}, "test": {k: float(v) for k, v in test.items()},
    }
    if out is not None and trainer.is_global_zero:
        from ..modules import inner
        if config.qat:  # a torch.export program that `optimize model_int8.pt2` takes
            qat.save(model, example, work / "model_int8.pt2")
        elif config.prune_channels:  # a new architecture: a torch.export program, not weights for the old one
            from .qat import export_program, save_program
            save_program(export_program(inner(model).eval(), example), work / "model.pt2")
        else:  # the user's architecture's own keys, so that `optimize package.module:attr --weights` takes them
            save_model(inner(model), str(work / "model.safetensors"))
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(work), str(out))
    scratch.remove(held)
    return TrainResult(model, out, summary)
