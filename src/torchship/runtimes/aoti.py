"""torch.export + AOTInductor, packaged as ``.pt2``: loads and runs without the model's Python code."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import BuildSkipped, first_line
from ._torch import (PRECISIONS, TorchRunner, cast_args, dynamic_shapes, example_args, export_dynamic, needs_module,
                     set_threads)
from .base import Artifact, calibration_batches, register

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import BuildOptions, LoadContext, Runner, Source


def export(model, device="cpu", precision="fp32"):
    """(program, dimension ranges): ``export_dynamic`` on the model at its device and precision."""
    needs_module(model)
    module = model.module
    if device != "cpu" or precision != "fp32":
        # a copy: the program holds the module's own weights, so moving the source back to the CPU after exporting
        # would move the program's too (AOTInductor on CUDA then found CPU weights beside CUDA inputs)
        import copy
        module = copy.deepcopy(module).to(device=device, dtype=PRECISIONS[precision])
    return export_dynamic(module, cast_args(example_args(model, 2, device), precision), model.spec)


def static_int8(program, model, ranges):
    """PT2E post-training static int8 (torchao, x86 inductor quantizer), calibrated, exported again."""
    from ..transforms.pt2e import quantize_static
    batches = [tuple(torch.from_numpy(b[n]) for n in model.spec.input_names) for b in calibration_batches(model)]
    try:
        converted = quantize_static(program.module(), batches)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the converted module takes the inputs flat: one shape spec per input
            return torch.export.export(converted, example_args(model, 2), dynamic_shapes=dynamic_shapes(model.spec, ranges)[0])
    except Exception as exc:
        raise BuildSkipped(f"PT2E static int8 failed: {first_line(exc, 240)}") from exc


def screen(program, model, floor: float) -> None:
    """PT2E's quantized program, run in eager on the calibration inputs (token inputs cut to their lengths) against
    the model: where its mean cosine misses ``floor`` by more than twice what the floor allows, ``BuildSkipped``
    before AOTInductor compiles it (MiniLM: 0.9922 here, and 47-67 s of compiling for a row rejected at 0.9917). The
    compiled int8 kernels compute what the quantize/dequantize pairs say; the margin leaves room for how they round."""
    from ..similarity import cosines
    from .control import cut_batches
    want, got, first = TorchRunner(model.module, model.spec), TorchRunner(program.module(), model.spec), \
        model.spec.output_names[0]
    found = []
    try:
        for b in cut_batches(calibration_batches(model)):
            found.append(cosines(want(b)[first], got(b)[first]))
    except Exception:  # a length outside the program's range, an output it cannot compare: the compile decides
        return
    cosine, bar = float(np.concatenate(found).mean()), 1 - 2 * (1 - floor)
    if cosine < bar:
        raise BuildSkipped(f"PT2E static int8 misses the budget before AOTInductor compiles it: the quantized program "
                           f"in eager keeps cosine {cosine:.6f} on the calibration inputs, under {bar:g} (twice the "
                           f"{1 - floor:g} the floor {floor:g} allows)")


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    device, precision = options.device, options.precision
    program, ranges = export(model, device, precision)
    if options.quantize == "static_int8":
        program = static_int8(program, model, ranges)
        if "cosine" in (options.floors or {}):
            screen(program, model, options.floors["cosine"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # freezing: weights become constants inductor folds and prepacks for the CPU's matrix units (digits-cnn bf16:
            # 1.12 against 1.56 ms a batch of 32, and a faster compile)
            torch._inductor.aoti_compile_and_package(program, package_path=str(workdir / "model.pt2"),
                                                     inductor_configs={"freezing": True})
    except Exception as exc:
        raise BuildSkipped(f"AOTInductor compile failed: {first_line(exc, 240)}") from exc
    return Artifact("aoti", ("model.pt2",), options.found(dim_ranges=ranges or {}))


def load(artifact: Artifact, root: Path, spec: IOSpec, ctx: LoadContext) -> Runner:
    """Refused where the package holds anything torch would unpickle; the native code it carries runs only with
    consent, which ``bundle.load`` asks for."""
    from ..safety import check_pt2
    check_pt2(root / artifact.files[0])
    set_threads(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = torch._inductor.aoti_load_package(str(root / artifact.files[0]))
    return TorchRunner(runner, spec, ctx.device, artifact.options.precision)


register("aoti", build, load)
