"""Transforms: ``nn.Module -> nn.Module``, one config dataclass and one handler each, registered together.

A new technique is one frozen config dataclass and one handler under ``@register(Config)``, here or in a module of
its own in this package (every module here is imported with it): the handler takes
``(module, config, context)`` and returns a new module; the config says what the search and the plan need to know
(``family``: the ``--transforms`` word that turns it on and the speed-up it can bound; ``covers``: the layers it
changes; ``needs_example``; ``devices``; ``offers()``: the variants the plan builds with it). Nothing else names it:
``tests/test_conformance.py`` holds every registered transform to those facts.

A transform never mutates its input: it returns a new module. ``at_load`` transforms (dynamic quantization)
are deterministic functions of the fp32 weights, so a bundle stores those weights and applies the transform
again when it loads; the others (pruning) change the weights, which the bundle then stores.

The configs import no torch (a bundle's manifest is checked against ``KINDS`` where torch is not installed); the
handlers import it when they run.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

if TYPE_CHECKING:
    from torch import nn

from ..errors import BuildSkipped, UsageError

# the most a family of techniques plausibly speeds up the layers it changes on a CPU (generous: a bound, not an
# estimate): (without, the CPU flag that raises it, with it). A runtime's own int8 and a lower precision are
# bounded the same way (``optimize.search``).
GAINS: dict[str, tuple[float, str | None, float]] = {
    "int8": (4.0, "amx_int8", 8.0), "bf16": (2.0, "amx_bf16", 4.0), "fp16": (2.0, "amx_bf16", 4.0),
    "prune": (1.25, None, 1.25),  # unstructured pruning: dense kernels do the same work
}


def most_gain(family: str, flags: frozenset, share: float = 1.0) -> float:
    """The bound of ``family`` on a CPU with ``flags``, where the layers it changes take ``share`` of the time
    (Amdahl: the rest runs as before)."""
    without, flag, with_it = GAINS[family]
    layer = with_it if flag in flags else without
    return 1.0 / ((1.0 - share) + share / layer)


@dataclass(frozen=True)
class Context:
    """What a handler may need besides the module and its config."""

    example: tuple | None = None  # example inputs, for transforms that trace the model (``needs_example``)


@dataclass(frozen=True)
class Offer:
    """A variant the plan builds with a transform: ``{runtime}+{label}``."""

    runtime: str
    label: str
    config: object
    note: str
    ladder: str | None = None  # variants of one ladder go gentle to aggressive (``level``); a failure stops the rest
    level: int = 0
    sibling: str | None = None  # a variant with the same numerics: when it fails the budget this one is not built
    check_for: str | None = None  # planned only where this runtime is too: it is that runtime's variant's sibling


@dataclass(frozen=True)
class Registered:
    config: type
    handler: Callable  # (module, config, Context) -> module


REGISTRY: dict[str, Registered] = {}  # by kind, in the order they were registered (the plan's order)
KINDS: dict[str, type] = {}  # kind -> config class (what a manifest's transforms may name)


def register(config_type: type):
    """Register ``config_type``'s handler: ``(module, config, context) -> module``. A config of a new family may
    bring the bound of its gain as ``gain = (without, cpu_flag, with_it)`` (see ``GAINS``)."""
    def wrap(fn):
        REGISTRY[config_type.kind] = Registered(config_type, fn)
        KINDS[config_type.kind] = config_type
        if getattr(config_type, "gain", None):
            GAINS.setdefault(config_type.family, tuple(config_type.gain))
        return fn
    return wrap


@dataclass(frozen=True)
class DynamicInt8:
    """int8 weights and dynamically quantized activations for nn.Linear (torch.ao, on the CPU); ``float_layers``: the
    Linear layers (by their names in the module) left in fp32 (eager's ``int8-mixed`` finds them, ``runtimes.eager``)."""

    float_layers: tuple[str, ...] = ()
    kind: str = "dynamic_int8"
    at_load: bool = True
    family: ClassVar[str] = "int8"
    covers: ClassVar[str] = "linear"  # the layers it changes (the search bounds its gain by their share of the time)
    needs_example: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu",)  # where the plan offers it

    def __post_init__(self):
        object.__setattr__(self, "float_layers", tuple(self.float_layers))  # a manifest's JSON list, as recorded

    @classmethod
    def offers(cls) -> tuple[Offer, ...]:
        return (Offer("eager", "int8", cls(), "torch.ao dynamic int8 Linear layers"),)


@dataclass(frozen=True)
class _Pruning:
    amount: float = 0.5

    def __post_init__(self):
        if not 0 < self.amount < 1:
            raise UsageError(f"pruning amount must lie strictly between 0 and 1, got {self.amount}")


PRUNE_LEVELS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class MagnitudePrune(_Pruning):
    """Unstructured L1 magnitude pruning of Linear and Conv weights, made permanent (zeros in dense tensors)."""

    kind: str = "magnitude_prune"
    at_load: bool = False
    family: ClassVar[str] = "prune"
    covers: ClassVar[str] = "all"
    needs_example: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    @classmethod
    def offers(cls) -> tuple[Offer, ...]:
        return tuple(Offer("eager", f"prune{int(a * 100)}", cls(a), f"{a:.0%} of Linear/Conv weights zeroed "
                           "(dense kernels: no speed-up expected)", ladder="prune", level=i)
                     for i, a in enumerate(PRUNE_LEVELS))


@dataclass(frozen=True)
class TorchaoInt8:
    """torchao int8 for nn.Linear: ``dynamic`` (int8 weights and per-token dynamic int8 activations) or
    ``weight_only`` (int8 weights, float activations: for linear-heavy models bound by weight memory)."""

    mode: str = "dynamic"
    kind: str = "torchao_int8"
    at_load: bool = True
    family: ClassVar[str] = "int8"
    covers: ClassVar[str] = "linear"
    needs_example: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def __post_init__(self):
        if self.mode not in ("dynamic", "weight_only"):
            raise UsageError(f"torchao int8 mode must be dynamic or weight_only, got {self.mode!r}")

    @classmethod
    def offers(cls) -> tuple[Offer, ...]:
        # numerics carry over from eager: when eager's fails the budget (a few seconds to build and check), compile's
        # is not built (MiniLM: 40-50 s of compiling each); eager's both first, so that they build side by side.
        # Weight-only int8 is for torch.compile (eager dequantizes each call): on eager only as that check
        return (Offer("eager", "ao-int8", cls(), "torchao int8 Linear layers (dynamic int8 activations)"),
                Offer("eager", "ao-int8wo", cls("weight_only"), "torchao int8 Linear layers (weight-only)",
                      check_for="compile"),
                Offer("compile", "ao-int8", cls(), "torchao int8 Linear layers (dynamic) under torch.compile",
                      sibling="eager+ao-int8"),
                Offer("compile", "ao-int8wo", cls("weight_only"), "torchao int8 Linear layers (weight-only) under "
                      "torch.compile", sibling="eager+ao-int8wo"))


@dataclass(frozen=True)
class ChannelPrune(_Pruning):
    """Structured pruning: the lowest-L2 ``amount`` of channels of every Conv/Linear (output layers kept whole) are
    removed through Torch-Pruning's dependency graph, so layers really shrink. Needs example inputs; fine-tune
    afterwards (``torchship train --prune-channels``, and the ``channels`` variants of ``train/derived.py``)."""

    kind: str = "channel_prune"
    at_load: bool = False
    family: ClassVar[str] = "channels"
    covers: ClassVar[str] = "all"
    needs_example: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    @classmethod
    def offers(cls) -> tuple[Offer, ...]:
        return ()  # not useful untrained: planned as a trained variant (train/derived.py)


def covers(config_dict: dict) -> str:
    """"linear" for a transform that changes nn.Linear layers only, else "all"."""
    cls = KINDS.get(config_dict.get("kind"))
    return getattr(cls, "covers", "all")


def family(config_dict: dict) -> str | None:
    cls = KINDS.get(config_dict.get("kind"))
    return getattr(cls, "family", None)


def offers(families) -> list[Offer]:
    """What the plan builds for the ``--transforms`` words ``families``, in registration order."""
    return [o for r in REGISTRY.values() if r.config.family in families for o in r.config.offers()]


def from_dict(d: dict):
    """The config a manifest or job recorded (round trip of ``to_dict``)."""
    kind = d.get("kind")
    if kind not in KINDS:
        raise UsageError(f"unknown transform {kind!r}; registered: {', '.join(sorted(KINDS))}")
    return KINDS[kind](**{k: v for k, v in d.items() if k not in ("kind", "at_load")})


def to_dict(config) -> dict:
    return asdict(config)


def apply(module: nn.Module, config, example: tuple | None = None) -> nn.Module:
    """A new module with ``config`` applied; ``example`` inputs for transforms that trace the model."""
    found = REGISTRY.get(getattr(config, "kind", None))
    if found is None or not isinstance(config, found.config):
        raise UsageError(f"no handler for {type(config).__name__}; registered: "
                         f"{', '.join(r.config.__name__ for r in REGISTRY.values())}")
    if config.needs_example and example is None:
        raise UsageError(f"{type(config).__name__} traces the model: pass example inputs")
    return found.handler(copy.deepcopy(module), config, Context(example))


@register(DynamicInt8)
def _dynamic_int8(module: nn.Module, config: DynamicInt8, context: Context) -> nn.Module:
    import torch
    from torch import nn
    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        raise BuildSkipped("dynamic int8 quantizes nn.Linear layers, and this model has none")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # per-channel weight scales (as for ONNX Runtime): per-tensor loses several points of cosine on transformers
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        names = {n for n, m in module.named_modules() if type(m) is nn.Linear}  # as {nn.Linear: qconfig} would
        if set(config.float_layers) - names:
            raise UsageError(f"dynamic int8: no Linear layer named {sorted(set(config.float_layers) - names)[0]!r} to "
                             "leave in fp32 in this model")
        spec = {n: qconfig for n in sorted(names - set(config.float_layers))}
        return torch.ao.quantization.quantize_dynamic(module.eval(), spec, dtype=torch.qint8)


@register(TorchaoInt8)
def _torchao_int8(module: nn.Module, config: TorchaoInt8, context: Context) -> nn.Module:
    from torch import nn
    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        raise BuildSkipped("torchao int8 quantizes nn.Linear layers, and this model has none")
    from .pt2e import torchao
    torchao()  # quiet imports, or the line naming the extra
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(module.eval(), Int8DynamicActivationInt8WeightConfig() if config.mode == "dynamic" else Int8WeightOnlyConfig())
    return module


def _prunable() -> tuple[type, ...]:
    from torch import nn
    return (nn.Linear, nn.modules.conv._ConvNd)


def __getattr__(name: str):
    if name == "PRUNABLE":  # the layer types pruning applies to (torch imported only when asked for)
        return _prunable()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _output_layers(module: nn.Module, example: tuple) -> list[nn.Module]:
    """Layers whose output is a model output: their channels are the model's interface, never pruned."""
    import torch
    PRUNABLE = _prunable()
    produced, hooks = {}, []
    for m in module.modules():
        if isinstance(m, PRUNABLE):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: produced.__setitem__(id(out), mod)))
    try:
        with torch.no_grad():
            outs = module(*example)
    finally:
        for h in hooks:
            h.remove()
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    found = [produced[id(o)] for o in outs if id(o) in produced]
    return found or [[m for m in module.modules() if isinstance(m, PRUNABLE)][-1]]


@register(ChannelPrune)
def _channel_prune(module: nn.Module, config: ChannelPrune, context: Context) -> nn.Module:
    example = context.example
    try:
        import torch_pruning as tp
    except ImportError as exc:
        from ..errors import MissingExtra
        raise MissingExtra("torch-pruning (for structured channel pruning)", "compress") from exc
    PRUNABLE = _prunable()
    if not any(isinstance(m, PRUNABLE) for m in module.modules()):
        raise BuildSkipped("channel pruning applies to Linear and Conv layers, and this model has none")
    training = module.training
    module.eval()
    pruner = tp.pruner.MagnitudePruner(module, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=config.amount, ignored_layers=_output_layers(module, example))
    pruner.step()
    return module.train(training)


@register(MagnitudePrune)
def _magnitude_prune(module: nn.Module, config: MagnitudePrune, context: Context) -> nn.Module:
    from torch.nn.utils import prune
    PRUNABLE = _prunable()
    targets = [(m, "weight") for m in module.modules() if isinstance(m, PRUNABLE)]
    if not targets:
        raise BuildSkipped("magnitude pruning applies to Linear and Conv layers, and this model has none")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=config.amount)
    for m, name in targets:
        prune.remove(m, name)
    return module


def sparsity(module: nn.Module) -> float:
    PRUNABLE = _prunable()
    weights = [m.weight for m in module.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / total) if total else 0.0


def _discover() -> None:
    """Import every module of this package: a transform in a module of its own registers itself when it loads."""
    import importlib
    import pkgutil
    for found in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{found.name}")


_discover()
