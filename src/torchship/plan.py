"""Which variants to build for a model: runtime x options (precision, reference rows)."""
from __future__ import annotations

from typing import Any

import msgspec

from .errors import UsageError
from .runtimes.base import DESCRIPTORS, MODULES


class VariantPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    runtime: str
    options: dict[str, Any] = {}
    selectable: bool = True
    note: str = ""
    transforms: tuple[dict[str, Any], ...] = ()  # transform configs as dicts (torchship.transforms.to_dict)
    family: str | None = None  # variants of one family go from gentle to aggressive: ...
    level: int = 0  # ... and a level is not tried once a gentler one failed the budget
    derived: tuple[str, float | None] | None = None  # (kind, level): trained from the model first (train.derived)
    parent: str | None = None  # the variant (or "model") this one is made from, for the lineage
    sibling: str | None = None  # the same transform on eager: when it fails the budget this one is not tried

    @property
    def skip(self) -> str | None:
        return self.options.get("skip")


RUNTIME_ORDER = MODULES  # the runtimes, in plan order (their descriptors)
NO_OPENVINO = "openvino is not installed: pip install 'torchship[openvino]'"


def _parent(v: VariantPlan) -> str:
    """What a variant is made from, for its lineage: "model" for a plain runtime and a variant trained from the
    model; else the plain variant its name starts with (onnxrt+int8 -> onnxrt, eager-bf16+x -> eager)."""
    if v.derived or v.name == v.runtime or v.name == "eager-naive":
        return "model"
    return v.name.split("+")[0].removesuffix("-bf16").removesuffix("-fp16").removesuffix("-f16")


def _has_openvino() -> bool:
    import importlib.util
    return importlib.util.find_spec("openvino") is not None
TRANSFORMS = ("int8", "prune", "bf16", "qat", "channels", "distill")  # the last three need training data
PRUNE_LEVELS = (0.3, 0.5, 0.7)


def plan(model, device: str = "cpu", runtimes: list[str] | None = None, threads: int | None = None,
         transforms: tuple[str, ...] = ("int8", "bf16"), trainable: bool = False,
         allow_specialization: bool = False) -> list[VariantPlan]:
    """Every variant to build; for a model that branches on its values (``model.branches``), the variants whose graph
    keeps one path are skipped with the reason, and TorchScript scripts, unless ``allow_specialization``."""
    out = [msgspec.structs.replace(v, parent=_parent(v)) for v in _plan(model, device, runtimes, threads, transforms,
                                                                          trainable)]
    branches = getattr(model, "branches", ())
    if not branches or allow_specialization:
        return out
    from .flow import SPECIALIZING, why_not
    why = why_not(branches)
    return [msgspec.structs.replace(v, options={**v.options, "skip": why}) if v.runtime in SPECIALIZING and not v.skip
            else msgspec.structs.replace(v, options={**v.options, "script": True}) if v.runtime == "torchscript"
            else v for v in out]


def _plan(model, device: str, runtimes: list[str] | None, threads: int | None, transforms: tuple[str, ...],
          trainable: bool) -> list[VariantPlan]:
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
    takes_onnx = tuple(r for r, d in DESCRIPTORS.items() if "onnx" in d.takes)  # the runtimes that run an ONNX source
    out += [VariantPlan(r, r, {**base, **({"skip": NO_OPENVINO} if r == "openvino" and not _has_openvino() else {})})
            for r in wanted if model.module is not None or r in takes_onnx]
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise UsageError(f"unknown transform(s) {unknown}; choose from {', '.join(TRANSFORMS)} (or none)")
    out += compression(model, wanted, base, device, transforms)
    if trainable and model.module is not None:
        out += trained(wanted, base, transforms)
    if "bf16" in transforms and device == "cpu" and model.module is not None:
        from .machine import NO_BF16, native_bf16
        for r in ("eager", "compile", "aoti"):
            if r in wanted:  # where the CPU lacks bf16, the build skips with the reason
                out.append(VariantPlan(f"{r}-bf16", r, {**base, "precision": "bf16", **({} if native_bf16() else {"skip": NO_BF16})},
                                       note="bf16 weights and activations (native on this CPU)"))
    if "bf16" in transforms and device == "cpu" and "openvino" in wanted and _has_openvino():
        from .runtimes.openvino import capabilities
        caps = capabilities()
        for prec, cap in (("bf16", "BF16"), ("fp16", "FP16")):
            why = None if cap in caps else (f"OpenVINO's CPU plugin reports no native {cap} on this CPU "
                                             f"(capabilities: {', '.join(caps) or 'none'})")
            out.append(VariantPlan(f"openvino-{'f16' if prec == 'fp16' else prec}", "openvino",
                                   {**base, "precision": prec, **({"skip": why} if why else {})},
                                   note=f"OpenVINO with {cap} inference precision (native on this CPU)"))
    if device.startswith("cuda") and model.module is not None:
        for prec in ("fp16", "bf16"):
            for r in ("eager", "aoti"):
                if r in wanted:
                    out.append(VariantPlan(f"{r}-{prec}", r, {**base, "precision": prec}, note=f"{prec} weights and activations"))
    return out


def compression(model, wanted, base, device, transforms) -> list[VariantPlan]:
    """int8 and pruning variants, gentle to aggressive."""
    from .transforms import DynamicInt8, MagnitudePrune, TorchaoInt8, to_dict
    out = []
    if "int8" in transforms and device == "cpu":
        if "eager" in wanted and model.module is not None:
            out.append(VariantPlan("eager+int8", "eager", dict(base), transforms=(to_dict(DynamicInt8()),),
                                   note="torch.ao dynamic int8 Linear layers"))
            out.append(VariantPlan("eager+ao-int8", "eager", dict(base), transforms=(to_dict(TorchaoInt8()),),
                                   note="torchao int8 Linear layers (dynamic int8 activations)"))
        if "compile" in wanted and model.module is not None:
            for mode, label in (("dynamic", "ao-int8"), ("weight_only", "ao-int8wo")):
                sibling = f"eager+{label}" if "eager" in wanted and label == "ao-int8" else None  # numerics carry over
                out.append(VariantPlan(f"compile+{label}", "compile", dict(base), transforms=(to_dict(TorchaoInt8(mode)),),
                                       note=f"torchao int8 Linear layers ({mode.replace('_', '-')}) under torch.compile",
                                       sibling=sibling))
        if "onnxrt" in wanted:
            out.append(VariantPlan("onnxrt+int8", "onnxrt", {**base, "quantize": "dynamic_int8"},
                                   note="ONNX Runtime dynamic int8 (per-channel QInt8 weights)"))
            out.append(VariantPlan("onnxrt+static-int8", "onnxrt", {**base, "quantize": "static_int8"},
                                   note="ONNX Runtime static int8 (QDQ, calibrated activations, per-channel weights)"))
        if "aoti" in wanted and model.module is not None:
            out.append(VariantPlan("aoti+static-int8", "aoti", {**base, "quantize": "static_int8"},
                                   note="PT2E static int8 (torchao, x86 inductor quantizer, calibrated) on AOTInductor"))
        if "openvino" in wanted and _has_openvino():
            out.append(VariantPlan("openvino+int8", "openvino", {**base, "quantize": "int8"},
                                   note="OpenVINO int8 (NNCF post-training quantization, calibrated)"))
            if _transformer(model):
                out.append(VariantPlan("openvino+int8-transformer", "openvino", {**base, "quantize": "int8_transformer"},
                                       note="OpenVINO int8 with NNCF's transformer preset (attention kept accurate)"))
    if "prune" in transforms and "eager" in wanted and model.module is not None:
        for i, amount in enumerate(PRUNE_LEVELS):
            out.append(VariantPlan(f"eager+prune{int(amount * 100)}", "eager", dict(base),
                                   transforms=(to_dict(MagnitudePrune(amount)),), family="prune", level=i,
                                   note=f"{amount:.0%} of Linear/Conv weights zeroed (dense kernels: no speed-up expected)"))
    return out


def _transformer(model) -> bool:
    """Attention inside: NNCF's transformer preset applies."""
    if model.arch is not None and model.arch.kind == "hf":
        return True
    return model.module is not None and any("attention" in type(m).__name__.lower() for m in model.module.modules())


def trained(wanted, base, transforms) -> list[VariantPlan]:
    """Variants of models trained from this one (with training data): built on the runtimes that take a program."""
    from .train.derived import CHANNEL_LEVELS, RUNTIMES
    runtimes = [r for r in RUNTIMES if r in wanted]
    out = []
    if "qat" in transforms:
        out += [VariantPlan(f"{r}+qat-int8", r, dict(base), derived=("qat", None),
                            note="quantization-aware fine-tuning to int8 (torchao PT2E, x86 inductor quantizer)") for r in runtimes]
    if "channels" in transforms:
        for i, amount in enumerate(CHANNEL_LEVELS):
            out += [VariantPlan(f"{r}+channels{int(amount * 100)}", r, dict(base), derived=("channels", amount),
                                family="channels", level=i,
                                note=f"{amount:.0%} of channels removed (Torch-Pruning), then fine-tuned") for r in runtimes]
    if "distill" in transforms:
        out += [VariantPlan(f"{r}+student", r, dict(base), derived=("distill", None),
                            note="a smaller student distilled from this model") for r in runtimes]
    return out
