"""Which variants to build for a model: runtime x options (precision, reference rows)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError


@dataclass(frozen=True)
class VariantPlan:
    name: str
    runtime: str
    options: dict = field(default_factory=dict)
    selectable: bool = True
    note: str = ""


RUNTIME_ORDER = ("eager", "torchscript", "compile", "aoti", "onnxrt")


def plan(model, device: str = "cpu", runtimes: list[str] | None = None, threads: int | None = None) -> list[VariantPlan]:
    wanted = list(runtimes or RUNTIME_ORDER)
    unknown = [r for r in wanted if r not in RUNTIME_ORDER]
    if unknown:
        raise UsageError(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIME_ORDER)}")
    base = {"device": device, "threads": threads}
    if device.startswith("cuda") and not model.spec.symbols:
        base["fixed_shapes"] = True
    out = []
    if model.module is not None:
        out.append(VariantPlan("eager-naive", "eager", {**base, "naive": True}, selectable=False,
                               note="reference: the model as too often run (no eval(), autograd on); never selected"))
    out += [VariantPlan(r, r, dict(base)) for r in wanted if model.module is not None or r == "onnxrt"]
    if device.startswith("cuda") and model.module is not None:
        for prec in ("fp16", "bf16"):
            for r in ("eager", "aoti"):
                if r in wanted:
                    out.append(VariantPlan(f"{r}-{prec}", r, {**base, "precision": prec}, note=f"{prec} weights and activations"))
    return out
