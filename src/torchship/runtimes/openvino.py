"""OpenVINO (extra ``openvino``): the model converted to OpenVINO IR (``model.xml`` + ``model.bin``: a graph and its
weights, no code), compiled for the CPU with the thread count serving uses and an inference precision: ``f32``,
or ``bf16``/``f16`` where the CPU runs them natively; ``int8`` through NNCF post-training quantization.

Conversion starts from the torch.export program the other runtimes use (dynamic dimensions as the IOSpec says); where
OpenVINO cannot take it, from the ONNX export. The artifact's options say which.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BuildSkipped, MissingExtra, first_line
from .base import Artifact, calibration_batches, register

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import BuildOptions, LoadContext, Runner, Source

PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _ov():
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtra("openvino", "openvino") from exc
    return ov


def capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin reports it runs natively here (FP32, BF16, FP16, INT8, ...); () without OpenVINO."""
    try:
        return tuple(_ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:
        return ()


def _convert(model, workdir):
    """(OpenVINO model, what it was converted from)."""
    ov = _ov()
    errors = []
    if model.module is not None:
        try:
            from ._torch import example_args, export_dynamic
            program, _ = export_dynamic(model.module, example_args(model, 2), model.spec)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ov.convert_model(program), "the torch.export program"
        except Exception as exc:
            errors.append(f"from the torch.export program: {first_line(exc, 160)}")
    onnx_path = model.onnx_path
    if onnx_path is None:
        from .onnxrt import export_onnx
        onnx_path = workdir / "export.onnx"
        try:
            export_onnx(model, onnx_path)
        except BuildSkipped as exc:
            errors.append(str(exc))
            raise BuildSkipped("OpenVINO conversion failed: " + "; ".join(errors)) from exc
    try:
        return ov.convert_model(str(onnx_path)), "the ONNX file" if model.onnx_path is not None else "the ONNX export"
    except Exception as exc:
        errors.append(f"from ONNX: {first_line(exc, 160)}")
        raise BuildSkipped("OpenVINO conversion failed: " + "; ".join(errors)) from exc


def _quantize(ov_model, model, options):
    """NNCF post-training int8, calibrated on the source's representative inputs (as the other static int8s)."""
    try:
        import nncf
    except ImportError as exc:
        raise MissingExtra("nncf (for OpenVINO int8)", "compress") from exc
    names = model.spec.input_names
    batches = calibration_batches(model)
    preset = nncf.ModelType.TRANSFORMER if options.quantize == "int8_transformer" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nncf.quantize(ov_model, nncf.Dataset(batches, lambda b: [b[n] for n in names]),
                                 subset_size=sum(len(next(iter(b.values()))) for b in batches),
                                 **({"model_type": preset} if preset else {}))
    except Exception as exc:
        raise BuildSkipped(f"NNCF int8 quantization failed: {first_line(exc, 200)}") from exc


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    ov = _ov()
    ov_model, source = _convert(model, workdir)
    if options.quantize in ("int8", "int8_transformer"):
        ov_model = _quantize(ov_model, model, options)
    ov.save_model(ov_model, str(workdir / "model.xml"), compress_to_fp16=False)  # the weights as they are
    (workdir / "export.onnx").unlink(missing_ok=True)
    return Artifact("openvino", ("model.xml", "model.bin"), options.found(converted_from=source))


class OvRunner:
    def __init__(self, compiled, spec):
        self.compiled, self.spec = compiled, spec
        self.request = compiled.create_infer_request()
        self.names = spec.input_names
        self.output_names = spec.output_names or [o.get_any_name() for o in compiled.outputs]

    def __call__(self, feeds):
        results = self.request.infer([np.ascontiguousarray(feeds[n]) for n in self.names])
        return {name: np.array(results[port]) for name, port in zip(self.output_names, self.compiled.outputs)}


def load(artifact: Artifact, root: Path, spec: IOSpec, ctx: LoadContext) -> Runner:
    ov = _ov()
    precision = PRECISIONS[artifact.options.precision]
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if ctx.threads:
        config["INFERENCE_NUM_THREADS"] = str(int(ctx.threads))
    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(str(root / artifact.files[0])), "CPU", config)
    except Exception as exc:
        raise BuildSkipped(f"OpenVINO cannot compile the model: {first_line(exc, 240)}") from exc
    return OvRunner(compiled, spec)


register("openvino", build, load, needs_torch=False)
