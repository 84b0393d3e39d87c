"""Fidelity: every variant against the eager fp32 reference on the same inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import msgspec
import numpy as np

from .errors import UsageError


@dataclass(frozen=True)
class Budget:
    """What a variant must keep. ``max_accuracy_drop`` applies when labels are given (absolute, 0.01 = 1 point) and
    then is the measure: the cosine and top-1 floors hold only where set. Without it (or without labels) they
    default to 0.999 and 0.99 of agreement with the fp32 original."""

    min_cosine: float | None = None
    min_top1: float | None = None
    max_accuracy_drop: float | None = None

    def floors(self, by_accuracy: bool) -> tuple[float | None, float | None]:
        """(cosine, top-1) floors in force: the defaults unless the task metric is the measure."""
        if by_accuracy:
            return self.min_cosine, self.min_top1
        return (0.999 if self.min_cosine is None else self.min_cosine), (0.99 if self.min_top1 is None else self.min_top1)

    _KEYS = {"cosine": "min_cosine", "top1": "min_top1", "accuracy_drop": "max_accuracy_drop"}

    @classmethod
    def parse(cls, text: str | None) -> "Budget":
        """``cosine=0.999,top1=0.99,accuracy_drop=0.01`` (any subset)."""
        if not text:
            return cls()
        values = {}
        for part in text.split(","):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in cls._KEYS:
                raise UsageError(f"--budget {text!r}: write KEY=VALUE[,...] with KEY one of {', '.join(cls._KEYS)}")
            try:
                number = float(val)
            except ValueError:
                raise UsageError(f"--budget: {key}={val!r} is not a number") from None
            if not 0 <= number <= 1:
                raise UsageError(f"--budget: {key}={number} must lie between 0 and 1")
            values[cls._KEYS[key]] = number
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def in_force(self, by_accuracy: bool = False) -> dict[str, float]:
        """The floors and limits that apply, defaults included (what a report prints)."""
        cosine, top1 = self.floors(by_accuracy and self.max_accuracy_drop is not None)
        values = {"cosine": cosine, "top1": top1, "accuracy_drop": self.max_accuracy_drop}
        return {k: v for k, v in values.items() if v is not None}


class Fidelity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_abs_error: float
    cosine: float  # mean over items of the per-item cosine similarity (first output)
    cosine_min: float
    top1: float | None  # agreement of argmax with the reference (classifiers)
    accuracy: float | None  # task metric when labels are given
    reference_accuracy: float | None
    passed: bool
    reason: str


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def compare(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], budget: Budget,
            task: str = "other", labels: np.ndarray | None = None) -> Fidelity:
    """Compare every output; the cosine and top-1 are taken on the first output."""
    names = list(reference)
    missing = [n for n in names if n not in outputs]
    if missing:
        return Fidelity(float("inf"), 0.0, 0.0, None, None, None, False, f"outputs missing: {missing}")
    for n in names:
        if reference[n].shape != outputs[n].shape:
            return Fidelity(float("inf"), 0.0, 0.0, None, None, None, False,
                            f"output {n!r} has shape {list(outputs[n].shape)}, reference {list(reference[n].shape)}")
    finite = all(np.isfinite(outputs[n]).all() for n in names if outputs[n].dtype.kind == "f")
    max_abs = max(float(np.abs(reference[n].astype(np.float64) - outputs[n].astype(np.float64)).max(initial=0)) for n in names)
    ref, out = reference[names[0]], outputs[names[0]]
    cos = _cosines(ref, out)
    top1 = acc = ref_acc = None
    if task == "classify":
        top1 = float((ref.argmax(-1) == out.argmax(-1)).mean())
        if labels is not None:
            acc, ref_acc = float((out.argmax(-1) == labels).mean()), float((ref.argmax(-1) == labels).mean())
    problems = []
    min_cos, min_top1 = budget.floors(acc is not None and budget.max_accuracy_drop is not None)
    if not finite:
        problems.append("non-finite outputs")
    if min_cos is not None and cos.mean() < min_cos:
        problems.append(f"cosine {cos.mean():.6f} < {min_cos}")
    if top1 is not None and min_top1 is not None and top1 < min_top1:
        problems.append(f"top-1 agreement {top1:.2%} < {min_top1:.0%}")
    if acc is not None and budget.max_accuracy_drop is not None and ref_acc - acc > budget.max_accuracy_drop:
        problems.append(f"accuracy drop {ref_acc - acc:.2%} > {budget.max_accuracy_drop:.2%}")
    return Fidelity(max_abs, float(cos.mean()), float(cos.min()), top1, acc, ref_acc, not problems,
                    "; ".join(problems) or "within budget")


def reference_outputs(model, pool: Mapping[str, np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """What every variant is compared with: eager fp32 (for an ONNX source, ONNX Runtime with every optimization off)."""
    if model.module is None:
        from .runtimes.onnxrt import OrtRunner, session
        runner = OrtRunner(session(model.onnx_path, optimize=False), model.spec)
    else:
        from .runtimes._torch import TorchRunner
        runner = TorchRunner(model.module.eval(), model.spec)
    from .spec import batches, concat_batches
    return concat_batches([runner(b) for b in batches(pool, chunk)])
