"""What became of each planned variant: one typed record from build to report."""
from __future__ import annotations

from typing import Any, Literal

import msgspec

from .profile import Stats
from .runtimes.base import Artifact, BuildOptions
from .verify import Fidelity

Status = Literal["ok", "rejected", "failed", "skipped"]


class Lineage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a variant came from: the variant (or the source model) it was made from, and by which step."""

    parent: str  # a variant name, or "model" for the source itself
    step: str  # e.g. "onnxrt export", "int8 (ONNX Runtime dynamic)", "qat (trained 3 epochs)"


class Training(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What training did for a variant trained from the model (``train.derived``)."""

    epochs: int
    seconds: float
    val: dict[str, float] = {}  # the validation metrics of the best epoch
    test: dict[str, float] = {}  # and on the held-out test split, where there is one
    parameters_before: int | None = None  # channel pruning: the model's parameters before and after
    parameters_after: int | None = None


class VariantResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    runtime: str
    status: Status
    reason: str = ""  # why it was rejected, failed or skipped
    note: str = ""  # what the variant is
    selectable: bool = True  # reference rows (eager-naive) are timed but never chosen
    options: BuildOptions = BuildOptions()
    transforms: tuple[dict[str, Any], ...] = ()
    lineage: Lineage | None = None
    artifact: Artifact | None = None
    fidelity: Fidelity | None = None
    profile: dict[int, Stats] = {}
    profile_errors: dict[int, str] = {}  # batch sizes the variant cannot run, with the error
    # timed on a mix of lengths (optimize.lengths): ``profile`` is the mix's; this, each size's at the target batch size
    by_length: dict[int, Stats] = {}
    build_s: float | None = None
    cold_start_s: float | None = None
    artifact_bytes: int | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    sparsity: float | None = None
    training: Training | None = None  # for a variant trained from the model: what training did
    cached: bool = False  # the artifact came from the build cache (same model, weights, data and options)
    samples: dict[int, tuple[tuple[float, ...], ...]] = {}  # seconds of every timed call, per batch size, per round
    wall_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def compressed(self) -> bool:
        """Quantized, pruned, lower precision or trained from the model: compared with its runtime uncompressed."""
        return bool(self.transforms or self.training is not None or self.options.quantize
                    or self.options.precision != "fp32")

    def throughput(self, batch: int) -> float | None:
        s = self.profile.get(batch)
        return s.throughput if s else None
