"""Which variants to build for a model: runtime x options (precision, reference rows)."""
from __future__ import annotations

from typing import Any

import msgspec
from msgspec.structs import replace

from .errors import UsageError
from .runtimes.base import DESCRIPTORS, MODULES, BuildOptions


class VariantPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    runtime: str
    options: BuildOptions = BuildOptions()
    selectable: bool = True
    note: str = ""
    transforms: tuple[dict[str, Any], ...] = ()  # transform configs as dicts (torchship.transforms.to_dict)
    family: str | None = None  # variants of one family go from gentle to aggressive: ...
    level: int = 0  # ... and a level is not tried once a gentler one failed the budget
    derived: tuple[str, float | None] | None = None  # (kind, level): trained from the model first (train.derived)
    parent: str | None = None  # the variant (or "model") this one is made from, for the lineage
    sibling: str | None = None  # the same transform on eager: when it fails the budget this one is not tried
    skip: str | None = None  # not built, for this reason (a CPU without the instructions, a missing extra)


RUNTIME_ORDER = MODULES  # the runtimes, in plan order (their descriptors)
NO_OPENVINO = "openvino is not installed: pip install 'torchship[openvino]'"
NO_FLOORS = ("int8 with accuracy control keeps a cosine or retrieval floor, and the budget in force has neither "
             "(add cosine= or retrieval= to --budget)")


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


def transform_words() -> tuple[str, ...]:
    """What ``--transforms`` takes: ``TRANSFORMS`` and the family of every registered transform."""
    from .transforms import REGISTRY
    return TRANSFORMS + tuple(dict.fromkeys(r.config.family for r in REGISTRY.values() if r.config.family not in TRANSFORMS))


def plan(model, device: str = "cpu", runtimes: list[str] | None = None, threads: int | None = None,
         transforms: tuple[str, ...] = ("int8", "bf16"), trainable: bool = False,
         allow_specialization: bool = False, floors: dict[str, float] | None = None) -> list[VariantPlan]:
    """Every variant to build; for a model that branches on its values (``model.branches``), the variants whose graph
    keeps one path are skipped with the reason, and TorchScript scripts, unless ``allow_specialization``. ``floors``:
    the budget's cosine and retrieval floors in force, which an int8 with accuracy control keeps as it builds."""
    out = [replace(v, parent=_parent(v)) for v in _plan(model, device, runtimes, threads, transforms, trainable, floors)]
    branches = getattr(model, "branches", ())
    if not branches or allow_specialization:
        return out
    from .flow import SPECIALIZING, why_not
    why = why_not(branches)
    return [replace(v, skip=why) if v.runtime in SPECIALIZING and not v.skip
            else replace(v, options=replace(v.options, script=True)) if v.runtime == "torchscript"
            else v for v in out]


def _plan(model, device: str, runtimes: list[str] | None, threads: int | None, transforms: tuple[str, ...],
          trainable: bool, floors: dict[str, float] | None) -> list[VariantPlan]:
    wanted = list(runtimes or RUNTIME_ORDER)
    unknown = [r for r in wanted if r not in RUNTIME_ORDER]
    if unknown:
        raise UsageError(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIME_ORDER)}")
    base = BuildOptions(device=device, threads=threads, fixed_shapes=device.startswith("cuda") and not model.spec.symbols)
    out = []
    if model.module is not None:
        out.append(VariantPlan("eager-naive", "eager", replace(base, naive=True), selectable=False,
                               note="reference: the model as too often run (no eval(), autograd on); never selected"))
    takes_onnx = tuple(r for r, d in DESCRIPTORS.items() if "onnx" in d.takes)  # the runtimes that run an ONNX source
    out += [VariantPlan(r, r, base, skip=NO_OPENVINO if r == "openvino" and not _has_openvino() else None)
            for r in wanted if model.module is not None or r in takes_onnx]
    words = transform_words()
    unknown = [t for t in transforms if t not in words]
    if unknown:
        raise UsageError(f"unknown transform(s) {unknown}; choose from {', '.join(words)} (or none)")
    out += compression(model, out, base, device, transforms, floors)
    if trainable and model.module is not None:
        out += trained(wanted, base, transforms)
    if "bf16" in transforms and device == "cpu" and model.module is not None:
        from .machine import NO_BF16, native_bf16
        for r in ("eager", "compile", "aoti"):
            if r in wanted:  # where the CPU lacks bf16, the build skips with the reason
                out.append(VariantPlan(f"{r}-bf16", r, replace(base, precision="bf16"), skip=None if native_bf16() else NO_BF16,
                                       note="bf16 weights and activations (native on this CPU)"))
    if "bf16" in transforms and device == "cpu" and "openvino" in wanted and _has_openvino():
        from .runtimes.openvino import capabilities
        caps = capabilities()
        for prec, cap in (("bf16", "BF16"), ("fp16", "FP16")):
            why = None if cap in caps else (f"OpenVINO's CPU plugin reports no native {cap} on this CPU "
                                             f"(capabilities: {', '.join(caps) or 'none'})")
            out.append(VariantPlan(f"openvino-{'f16' if prec == 'fp16' else prec}", "openvino",
                                   replace(base, precision=prec), skip=why, note=f"OpenVINO with {cap} inference precision (native on this CPU)"))
    if device.startswith("cuda") and model.module is not None:
        for prec in ("fp16", "bf16"):
            for r in ("eager", "aoti"):
                if r in wanted:
                    out.append(VariantPlan(f"{r}-{prec}", r, replace(base, precision=prec), note=f"{prec} weights and activations"))
    return out


def compression(model, planned: list[VariantPlan], base: BuildOptions, device: str, transforms,
                floors: dict[str, float] | None = None) -> list[VariantPlan]:
    """Family by family (``TRANSFORMS``' order): the registered transforms' offers on the runtimes planned with a
    module, and for int8, each planned runtime's own (its descriptor's ``quantizes``, on the CPU); gentle to aggressive
    within a ladder. A runtime's int8 that does not suit the model's family is a row skipped with the reason."""
    from .transforms import offers, to_dict
    plain = {v.runtime for v in planned if v.name == v.runtime and not v.skip}
    out: list[VariantPlan] = []
    for fam in (t for t in transform_words() if t in transforms):
        for o in offers((fam,)) if model.module is not None else ():
            if (o.runtime in plain and device.split(":")[0] in o.config.devices
                    and (o.check_for is None or o.check_for in plain)):
                out.append(VariantPlan(f"{o.runtime}+{o.label}", o.runtime, base, transforms=(to_dict(o.config),),
                                       note=o.note, family=o.ladder, level=o.level,
                                       sibling=o.sibling if any(v.name == o.sibling for v in out) else None))
        if fam == "int8" and device == "cpu":
            transformer = _transformer(model)
            for r, q in ((r, q) for r, d in DESCRIPTORS.items() if r in plain for q in d.quantizes):
                if q.transformers_only and not transformer:
                    continue
                options, skip = replace(base, quantize=q.quantize), q.not_for_transformers if transformer else None
                if q.keeps_floors or q.screens:
                    options = replace(options, floors=dict(floors or {}))
                if q.keeps_floors:
                    skip = skip or (None if floors else NO_FLOORS)
                out.append(VariantPlan(f"{r}+{q.label}", r, options, note=q.note, skip=skip))
    return out


def _transformer(model) -> bool:
    """Attention inside: NNCF's transformer preset applies."""
    if model.arch is not None and model.arch.kind == "hf":
        return True
    return model.module is not None and any("attention" in type(m).__name__.lower() for m in model.module.modules())


def trained(wanted, base, transforms) -> list[VariantPlan]:
    """Variants of models trained from this one (with training data): built on the runtimes that take a program."""
    from .train.derived import RUNTIMES, TRAINED
    runtimes = [r for r in RUNTIMES if r in wanted]
    out = []
    for t in (t for t in TRAINED if t.kind in transforms):
        for i, level in enumerate(t.levels):
            pct = "" if level is None else f"{int(level * 100)}"
            out += [VariantPlan(f"{r}+{t.label.format(pct=pct)}", r, base, derived=(t.kind, level), note=t.note.format(pct=pct),
                                family=t.kind if len(t.levels) > 1 else None, level=i) for r in runtimes]
    return out
