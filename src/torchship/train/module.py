"""The LightningModule: one task loss (or distillation from a teacher), AdamW, a schedule, NaN detection."""
from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from ..modules import flatten_outputs
from ..errors import TrainingDiverged
from .data import augment_images


def first_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return flatten_outputs(model(x))[0]


def task_loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classify":
        return F.cross_entropy(out, y)
    if task == "regress":
        return F.mse_loss(out.reshape(y.shape), y.to(out.dtype))
    return (1 - F.cosine_similarity(out, y.to(out.dtype), dim=-1)).mean()  # embed: targets are embeddings


def distill_loss(task: str, student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float):
    """Classifiers: KL on temperature-softened logits mixed with the hard-label loss; embeddings: cosine."""
    if task == "classify":
        soft = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature**2
        return alpha * soft + (1 - alpha) * F.cross_entropy(student, y)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


class SyncTeardown(L.Callback):
    """Every process reaches the end of fit before any tears down: a rank that exits while another still talks
    to it over gloo aborts (seen once under load as 'terminate called without an active exception')."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


class TaskModule(L.LightningModule):
    def __init__(self, model: nn.Module, config, teacher: nn.Module | None = None):
        super().__init__()
        self.model, self.config, self.teacher = model, config, teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def forward(self, x):
        return first_output(self.model, x)

    def training_step(self, batch, idx):
        x, y = batch
        if self.config.augment:
            x = augment_images(x)
        out = self(x)
        if self.teacher is not None:
            with torch.no_grad():
                target = first_output(self.teacher, x)
            loss = distill_loss(self.config.task, out, target, y, self.config.temperature, self.config.alpha)
        else:
            loss = task_loss(self.config.task, out, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(self._diagnose(x, loss))
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _diagnose(self, x, loss) -> str:
        from ..hooks import watch
        with watch(self.model) as w, torch.no_grad():
            self.model(x)
        where = (f"the first module with a non-finite output is {w.first_nonfinite['module']!r} "
                 f"({w.first_nonfinite['type']})") if w.first_nonfinite else "every module's output was finite: the loss itself overflowed"
        return (f"the loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); {where}. "
                "Lower the learning rate, keep gradient clipping on, or check the inputs for NaN")

    def _evaluate(self, batch, split):
        x, y = batch
        out = self(x)
        self.log(f"{split}_loss", task_loss(self.config.task, out, y), prog_bar=split == "val", sync_dist=True)
        if self.config.task == "classify":
            self.log(f"{split}_acc", (out.argmax(-1) == y).float().mean(), prog_bar=split == "val", sync_dist=True)

    def validation_step(self, batch, idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        c = self.config
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=c.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(c.warmup_fraction * total)
        if c.schedule == "cosine":
            fn = lambda s: (s + 1) / max(1, warm) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))  # noqa: E731
        elif c.schedule == "step":
            fn = lambda s: 0.1 ** (3 * s // total)  # noqa: E731  (x0.1 at each third)
        elif c.schedule == "poly":
            fn = lambda s: max(0.0, 1 - s / total) ** 2  # noqa: E731
        else:
            fn = lambda s: 1.0  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
