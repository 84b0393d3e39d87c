"""The runtime protocol: ``build(model, options, workdir) -> Artifact`` and ``load(artifact, root, spec, ctx) -> Runner``.

A Runner maps ``{name: array}`` to ``{name: array}`` for a whole batch and nothing else. Each runtime module calls
``register(name, build, load)``; ``get(name)`` finds one. Static settings travel in ``Artifact.options`` (written to
the manifest); run-time settings (device, threads, consent to import code) in a ``LoadContext``. Nothing here imports
torch: a bundle whose runtime does not need torch loads without it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

import msgspec
import numpy as np

from ..arch import Architecture
from ..errors import BuildSkipped, UsageError, missing_extra
from ..spec import IOSpec


class Runner(Protocol):
    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Source(Protocol):
    """What a runtime's ``build`` reads of a model (``sources.Model`` is one; this module imports no torch)."""

    module: Any  # the normalized nn.Module, or None for an ONNX source
    spec: IOSpec
    dims: dict[str, int]  # an example size for each symbolic dimension
    arch: Architecture | None  # how a fresh process rebuilds the module (eager, compile)
    onnx_path: Path | None  # an ONNX source
    converted: Path | None  # the plain variant's conversion its other variants start from (``Descriptor.converted``)
    eval_data: dict[str, np.ndarray] | None  # example inputs (traces, exports)
    calibration_data: dict[str, np.ndarray] | None  # static int8's calibration inputs
    raw_data: dict[str, np.ndarray] | None  # raw input through the bundle's pipeline, one batch (or None)


Precision = Literal["fp32", "bf16", "fp16"]
# runtime-side int8, done by the runtime's own toolkit when it builds (see each Descriptor's ``quantizes``)
Quantization = Literal["dynamic_int8", "dynamic_int8_mixed", "static_int8", "static_int8_mixed", "int8", "int8_transformer",
                       "int8_mixed"]


class BuildOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How one variant is built, and what its load needs again: the plan sets the first fields, the runtime's
    ``build`` reads them and adds what it found (the last ones); the artifact keeps them in the manifest. Options
    nobody set are left out of the manifest (a bundle's manifest says only what differs from plain fp32)."""

    device: str = "cpu"
    threads: int | None = None  # intra-op threads it was built and timed with
    precision: Precision = "fp32"  # weights and activations
    quantize: Quantization | None = None
    fixed_shapes: bool = False  # CUDA: every batch has the example's shapes (cudnn autotunes)
    naive: bool = False  # the reference as too often run: training mode, autograd on (never selected)
    script: bool = False  # TorchScript: script, not trace (the model branches on its values)
    # what the build found
    transforms: tuple[dict, ...] = ()  # at-load transforms (torchship.transforms.to_dict), applied again at load
    mode: Literal["trace", "script"] | None = None  # TorchScript: how the file was made
    notes: tuple[str, ...] = ()  # TorchScript: why a trace was not kept
    converted_from: str | None = None  # OpenVINO: what the IR was converted from, in words
    dim_ranges: dict[str, tuple[int, int]] = {}  # an export's range for each dynamic dimension
    # int8 with accuracy control ("int8_mixed"): the budget's floors (cosine, retrieval) it keeps on the calibration
    # data (set by the plan), and which layers stayed in float to keep them, in words (found)
    floors: dict[str, float] = {}
    layout: str | None = None

    def found(self, **found) -> BuildOptions:
        """These options with what the build found."""
        return msgspec.structs.replace(self, **found)


class Artifact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Files on disk (relative to a root directory) and the static options needed to load them."""

    runtime: str
    files: tuple[str, ...]
    options: BuildOptions = BuildOptions()
    architecture: Architecture | None = None  # eager/compile: how to rebuild the module the weights belong to


class LoadContext(msgspec.Struct, frozen=True):
    """Run-time settings of one load, apart from the artifact's static options."""

    device: str = "cpu"
    threads: int | None = None  # intra-op threads (None: the runtime's default)
    spin: bool = True  # idle intra-op threads may spin between calls (off for a process with other work between them)
    trust_code: bool = False  # a python architecture from outside torchship may be imported


@dataclass(frozen=True)
class Runtime:
    name: str
    build: Callable[[Source, BuildOptions, Path], Artifact]
    load: Callable[[Artifact, Path, IOSpec, LoadContext], Runner]
    needs_torch: bool = True  # loading imports torch (a serving install without torch cannot run it)


class Quantizer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """int8 a runtime's own toolkit does as it builds (``BuildOptions.quantize``): the plan builds ``{runtime}+{label}``
    on every CPU, and the search bounds its gain as the ``int8`` family's (``transforms.GAINS``)."""

    quantize: Quantization
    label: str
    note: str
    transformers_only: bool = False  # planned only for a model with attention inside (a preset made for them)
    not_for_transformers: str | None = None  # why it is not built for a model with attention inside (a skipped row)
    keeps_floors: bool = False  # it holds the budget's floors as it builds (``BuildOptions.floors``, set by the plan)
    # its quantized graph is held to the budget's cosine floor (``BuildOptions.floors``) before a costly compile
    screens: bool = False
    calibrated: bool = False  # its activation ranges are calibrated on data (inputs scaled beyond them are not judged)
    covers: Literal["linear", "all"] = "all"  # the layers it changes (the search bounds its gain by their share of the time)


class Descriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a runtime is, as data and without torch: what the plan, the choice, the bundle, the control-flow rule and
    the CLI know of it. A new runtime is its module (``build``, ``load``, ``register``) and one entry in
    ``DESCRIPTORS``; ``tests/test_runtimes.py`` fails on a runtime that lacks either."""

    name: str
    what: str  # what a bundle of it runs from, in words (a tie is explained with it)
    simplicity: int  # rank in a tie, lower is simpler: fewer moving parts at serving time
    # what it builds from: "module" (an nn.Module), "onnx" (an ONNX source), "program" (an exported program: the
    # variants trained from the model, train/derived.py)
    takes: tuple[str, ...] = ("module",)
    specializes: bool = False  # its graph is a trace or an export: it keeps one path of control flow on values
    native: str | None = None  # the native code that loading runs, in words ("the shared library ..."): consent needed
    extra: str = "torch"  # the extra that installs what it needs to build
    quantizes: tuple[Quantizer, ...] = ()  # its own int8, planned with the "int8" transforms
    # the file in the plain variant's build that its other variants (int8, bf16) start from instead of converting the
    # model again (``Source.converted``)
    converted: str | None = None


# in the order the plan lists them
DESCRIPTORS: dict[str, Descriptor] = {d.name: d for d in (
    Descriptor("eager", "the model's own Python code", 4, quantizes=(
        Quantizer("dynamic_int8_mixed", "int8-mixed", "torch.ao dynamic int8 Linear layers, those the budget cannot "
                  "afford in int8 kept in fp32, measured on the calibration data and on raw input", keeps_floors=True,
                  covers="linear", not_for_transformers=(
                      "a transformer's raw text needs most Linear layers in fp32 (MiniLM: 32 of 37 at the default budget, "
                      "found after 41 s, too few left in int8 to gain), and where a layout holds, torchao's int8 is "
                      "faster (MiniLM at retrieval 0.95: eager+ao-int8 1.23x it): OpenVINO's int8-mixed is built for "
                      "such models")),)),
    Descriptor("torchscript", "a TorchScript file, no Python code", 2),  # traces, or scripts (see flow.specialized)
    Descriptor("compile", "the model's Python code, compiled at every load", 5),
    Descriptor("aoti", "a compiled AOTInductor package, no Python code", 3, takes=("module", "program"), specializes=True,
               native="the shared library AOTInductor compiled into", quantizes=(
                   Quantizer("static_int8", "static-int8", "PT2E static int8 (torchao, x86 inductor quantizer, calibrated) "
                             "on AOTInductor", calibrated=True, screens=True),)),
    Descriptor("onnxrt", "a single self-contained ONNX file", 0, takes=("module", "onnx", "program"), specializes=True,
               quantizes=(Quantizer("dynamic_int8", "int8", "ONNX Runtime dynamic int8 (per-channel QInt8 weights)"),
                          Quantizer("static_int8", "static-int8", "ONNX Runtime static int8 (QDQ, calibrated activations, "
                                    "per-channel weights)", calibrated=True),
                          Quantizer("static_int8_mixed", "static-int8-mixed", "ONNX Runtime static int8, the nodes the "
                                    "budget cannot afford in int8 kept in fp32, measured on the calibration data and on "
                                    "raw input", keeps_floors=True, calibrated=True, not_for_transformers=(
                                        "ONNX Runtime's static int8 loses attention to activation outliers (cosine 0.37 "
                                        "on MiniLM), and a node at a time costs a quantization: OpenVINO's int8-mixed "
                                        "is built for such models"))),
               converted="model.onnx"),
    Descriptor("openvino", "an OpenVINO IR, no Python code", 1, takes=("module", "onnx"), specializes=True,
               extra="openvino", quantizes=(
                   Quantizer("int8", "int8", "OpenVINO int8 (NNCF post-training quantization, calibrated)",
                             calibrated=True, not_for_transformers="NNCF's default preset quantizes what attention needs accurate (its "
                             "softmax and layer norms; cosine 0.6 on MiniLM): int8-transformer and int8-mixed are built "
                             "for this model instead"),
                   Quantizer("int8_transformer", "int8-transformer", "OpenVINO int8 with NNCF's transformer preset "
                             "(attention kept accurate)", transformers_only=True, calibrated=True),
                   Quantizer("int8_mixed", "int8-mixed", "OpenVINO int8 with NNCF's transformer preset, the layers the "
                             "budget cannot afford in int8 kept in float (bf16 where native), measured on the calibration "
                             "data and on raw input", transformers_only=True, keeps_floors=True,
                             calibrated=True)),
               converted="model.xml"),
)}
MODULES = tuple(DESCRIPTORS)
_REGISTRY: dict[str, Runtime] = {}


def describe(name: str) -> Descriptor:
    """The descriptor of runtime ``name`` (an unknown one: the error naming the known ones)."""
    if name not in DESCRIPTORS:
        raise UsageError(f"unknown runtime {name!r}; registered runtimes: {', '.join(MODULES)}")
    return DESCRIPTORS[name]


def quantizer(runtime: str, quantize: Quantization | None) -> Quantizer | None:
    """The runtime's own int8 that ``quantize`` names (``BuildOptions.quantize``), or None."""
    return next((q for q in describe(runtime).quantizes if q.quantize == quantize), None)


def register(name: str, build: Callable, load: Callable, *, needs_torch: bool = True) -> None:
    _REGISTRY[name] = Runtime(name, build, load, needs_torch)


def get(name: str) -> Runtime:
    """The registered runtime ``name``; only its own module is imported (ONNX Runtime's loads without torch)."""
    if name not in MODULES:
        raise UsageError(f"unknown runtime {name!r}; registered runtimes: {', '.join(sorted(MODULES))}")
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            raise missing_extra(exc, f"the {name} runtime") from exc
    return _REGISTRY[name]


def calibration_batches(model, items: int = 128, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Representative inputs for static int8: the source's calibration data, else the verification inputs."""
    data = model.calibration_data or model.eval_data
    if not data:
        raise BuildSkipped("static int8 needs calibration inputs, and this model has none")
    n = min(items, len(next(iter(data.values()))))
    return [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in data.items()} for i in range(0, n, batch)]
