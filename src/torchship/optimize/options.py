"""``OptimizeOptions``: what one optimize run is asked to do, checked when it is made (the CLI's options map onto it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from ..verify import Budget


@dataclass(frozen=True)
class OptimizeOptions:
    device: str = "cpu"
    budget: Budget = field(default_factory=Budget)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    target_batch_size: int | None = None  # default: the largest batch size
    latency_slo_ms: float | None = None
    runtimes: tuple[str, ...] | None = None
    threads: int | None = None  # intra-op threads, as serving will use; default: all cores
    timeout_s: float = 600.0
    seconds_per_size: float = 0.5  # timing per variant and batch size, spread over the rounds
    isolate: bool = True  # each variant in its own process
    transforms: tuple[str, ...] = ("int8", "bf16", "qat", "channels", "distill")  # see plan.TRANSFORMS
    train_epochs: int | None = None  # for the trained variants (qat, channels, distill); default: per kind
    time_budget_s: float | None = None  # the whole search; builds stop at 3/4 of it (once a candidate is built), timing rounds at all of it
    exhaustive: bool = False  # build compressed variants even where their runtime is too far behind to win
    cache: bool = True  # reuse builds of the same model, weights, data and options (TORCHSHIP_CACHE/builds)
    processing: bool = True  # package the text pipeline (tokenizer.json) where the source has one, checked end to end
    allow_specialization: bool = False  # a model that branches on its values: traced/exported variants compete anyway
    # the sizes of a dynamic dimension to time at ({"seq": (16, 32, 64)}; {}: the example's only); default: the
    # lengths of the held-out data's items, where an attention mask says them (optimize.lengths)
    lengths: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self):
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.target_batch_size is not None and self.target_batch_size not in self.batch_sizes:
            raise UsageError(f"target batch size {self.target_batch_size} is not among --batch-sizes {list(self.batch_sizes)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UsageError(f"--time-budget must be a positive number of seconds, got {self.time_budget_s}")
        if self.seconds_per_size <= 0:
            raise UsageError(f"seconds per batch size must be positive, got {self.seconds_per_size}")
        if self.train_epochs is not None and self.train_epochs < 1:
            raise UsageError(f"--train-epochs must be at least 1, got {self.train_epochs}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"--device {self.device!r}: use cpu or cuda")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")

    @property
    def target(self) -> int:
        return self.target_batch_size or max(self.batch_sizes)
