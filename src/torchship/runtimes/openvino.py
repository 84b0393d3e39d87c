"""OpenVINO (extra ``openvino``): the model converted to OpenVINO IR (``model.xml`` + ``model.bin``: a graph and its
weights, no code), compiled for the CPU with the thread count serving uses and an inference precision: ``f32``,
or ``bf16``/``f16`` where the CPU runs them natively; ``int8`` through NNCF post-training quantization.

Conversion starts from the torch.export program the other runtimes use (dynamic dimensions as the IOSpec says); where
OpenVINO cannot take it, from the ONNX export. The artifact's options say which.
"""
from __future__ import annotations

import json
import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BuildSkipped, MissingExtra, first_line
from .base import Artifact, calibration_batches, register
from .control import Control, cut_batches, layout, least_in_float, measures, shares

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import BuildOptions, LoadContext, Runner, Source

log = logging.getLogger(__name__)
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


def _module_paths(program) -> dict[str, str]:
    """Each node of an exported program -> the path of the module that ran it (``encoder.layer.0.output.dense``)."""
    paths = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            paths[node.name] = path.removeprefix("L['self'].").removeprefix("L__self__.")
    return paths


CONVERTED = "converted.json"  # beside the plain variant's IR: what it was converted from, each operation's module path


def _convert(model, workdir):
    """(OpenVINO model, what it was converted from, each operation's module path where known): read back from the
    plain variant's IR where it left one (``Source.converted``: 6-8 s of export and conversion on MiniLM, each time),
    else converted from the torch.export program, or from ONNX."""
    ov = _ov()
    side = model.converted and model.converted.with_name(CONVERTED)
    if side and side.exists():
        found = json.loads(side.read_text())
        return ov.Core().read_model(str(model.converted)), found["from"], found["paths"]
    errors = []
    if model.module is not None:
        try:
            from ._torch import example_args, export_dynamic
            program, _ = export_dynamic(model.module, example_args(model, 2), model.spec)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ov.convert_model(program), "the torch.export program", _module_paths(program)
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
        return (ov.convert_model(str(onnx_path)), "the ONNX file" if model.onnx_path is not None else "the ONNX export",
                {})
    except Exception as exc:
        errors.append(f"from ONNX: {first_line(exc, 160)}")
        raise BuildSkipped("OpenVINO conversion failed: " + "; ".join(errors)) from exc


def _nncf():
    try:
        import nncf
    except ImportError as exc:
        raise MissingExtra("nncf (for OpenVINO int8)", "compress") from exc
    nncf.set_log_level(logging.WARNING)  # not a line for each operation it leaves alone
    return nncf


def _quantize(ov_model, model, options, ignored: tuple[str, ...] = (), plain: bool = False):
    """NNCF post-training int8, calibrated on the source's representative inputs (as the other static int8s; token
    inputs cut to their lengths, ``cut_batches``: MiniLM's int8-transformer 17 s -> 12 s to build, cosine 0.99713 ->
    0.99740, the statistics no longer taken over padding);
    ``ignored``: the operations left in float; ``plain``: no SmoothQuant and no bias correction (each quantized
    weight is then the original's, quantized, so that taking an operation's quantizers out restores it exactly)."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    names = model.spec.input_names
    batches = cut_batches(calibration_batches(model))
    kw = {}
    if options.quantize in ("int8_transformer", "int8_mixed"):
        kw["model_type"] = nncf.ModelType.TRANSFORMER
    if ignored:
        kw["ignored_scope"] = nncf.IgnoredScope(names=list(ignored), validate=False)
    if plain:
        kw["advanced_parameters"] = AdvancedQuantizationParameters(
            disable_bias_correction=True, smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1, convolution=-1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nncf.quantize(ov_model, nncf.Dataset(batches, lambda b: [b[n] for n in names]),
                                 subset_size=sum(len(next(iter(b.values()))) for b in batches), **kw)
    except Exception as exc:
        raise BuildSkipped(f"NNCF int8 quantization failed: {first_line(exc, 200)}") from exc


class _Control(Control):
    """``control.Control`` for an OpenVINO model: compiled for the CPU at the precision it will run at."""

    def __init__(self, ov_model, model, options, precision: str):
        self.core = _ov().Core()
        super().__init__(ov_model, model, options, precision)

    def compiled(self, ov_model, precision: str):
        compiled = self.core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISIONS[precision],
                                                             "NUM_STREAMS": "1"})
        return lambda inputs: compiled(inputs)[0]


_SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")


def _quantizers(op) -> list[tuple[object, int, object]]:
    """The quantizers on ``op``'s inputs (through reshapes): (the node they feed, its input, the FakeQuantize)."""
    found = []
    for i in range(op.get_input_size()):
        node, index = op, i
        while True:
            source = node.input_value(index).get_node()
            kind = source.get_type_name()
            if kind == "FakeQuantize":
                found.append((node, index, source))
                break
            if kind not in _SHAPE_OPS:
                break
            node, index = source, 0
    return found


_WEIGHTED = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData", "Gather")  # NNCF's int8 weights


def _weights(op) -> dict[int, object]:
    """The inputs of ``op`` (in the float model) that are weights NNCF stores in int8: the float constants of two
    dimensions or more of a matrix multiplication, a convolution or an embedding table."""
    if op.get_type_name() not in _WEIGHTED:
        return {}
    return {i: v.get_node() for i, v in enumerate(op.input_values()) if v.get_node().get_type_name() == "Constant"
            and v.get_element_type().is_real() and len(v.get_partial_shape()) >= 2}


def _in_float(quantized, names: set[str], original):
    """A copy of a quantized model with the operations ``names`` in float: their activations taken before the
    quantizers, their weights (int8 in the quantized model) the original model's."""
    from openvino import opset13 as ops
    weights = {op.get_friendly_name(): {i: c.get_data() for i, c in _weights(op).items()}
               for op in original.get_ordered_ops() if op.get_friendly_name() in names}
    copy = quantized.clone()
    for op in copy.get_ordered_ops():
        if op.get_friendly_name() in names:
            for node, index, fq in _quantizers(op):
                node.input(index).replace_source_output(fq.input_value(0))
            for i, data in weights.get(op.get_friendly_name(), {}).items():
                op.input(i).replace_source_output(ops.constant(data).output(0))
    copy.validate_nodes_and_infer_types()
    return copy


def _quantized_ops(quantized, original) -> list[str]:
    """The operations int8 reaches: those with a quantizer on an input, and those with weights (a matrix
    multiplication's, a convolution's, an embedding table: NNCF stores them in int8)."""
    weighted = {op.get_friendly_name() for op in original.get_ordered_ops() if _weights(op)}
    return [op.get_friendly_name() for op in quantized.get_ordered_ops()
            if op.get_type_name() not in _SHAPE_OPS + ("FakeQuantize",)
            and (_quantizers(op) or op.get_friendly_name() in weighted)]


def _short(names: list[str], paths: dict[str, str]) -> str:
    """Operations as a person reads them: the module that ran each (where the export said), less the path they all
    share but its last part (``layer.0.output.dense``)."""
    parts = [paths.get(n.split("/")[0], n.split("/")[0]).split(".") for n in names]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ", ".join(".".join(p[max(0, common - 1):]) for p in parts)


def _shares(names: list[str], original) -> dict[str, float]:
    """Each operation's share of the weights of the model's matrix multiplications and convolutions (what their
    FLOPs per item scale with; embedding tables and the attention products, which have no weights, count nothing)."""
    return shares({op.get_friendly_name(): sum(int(np.prod(c.get_output_shape(0))) for c in _weights(op).values())
                   for op in original.get_ordered_ops() if op.get_type_name() != "Gather"}, names)


def _mixed(ov_model, model, options, paths: dict[str, str]) -> tuple[object, str, str]:
    """int8 with accuracy control: NNCF's transformer preset, and where it then keeps less than the budget's floors
    (with ``MIXED_MARGIN`` spare) on the calibration data or on raw input (``_Control``), the operations that cost the
    most kept in float (bf16 where the CPU runs it natively), as few as hold the floors. What each operation costs is
    measured on a plain quantization (no SmoothQuant, no bias correction: both change what is around a quantizer) by
    putting it alone back in float. The recipe that keeps more of the floors, full or plain (SmoothQuant and bias
    correction fit the calibration data, and can cost short or unusual text more than they gain), is then quantized
    with all but the cheapest left out (under a cosine floor: where even that misses, nothing will), then the costliest
    2, 4, 8, ... until the floors hold, and the fewest that hold found by bisection. (quantized model, precision,
    layout in words)."""
    precision = "bf16" if "BF16" in capabilities() else "fp32"
    control = _Control(ov_model, model, options, precision)
    full = _quantize(ov_model, model, options)
    full_kept = control.kept(full)
    if control.room(full_kept) >= 0:
        return full, precision, (f"int8 on every operation the transformer preset quantizes, the rest in {precision} "
                                 f"({measures(full_kept)})")
    plain = _quantize(ov_model, model, options, plain=True)
    plain_kept = control.kept(plain)
    base = control.room(plain_kept)
    if base >= 0:
        return plain, precision, (f"int8 on every operation the transformer preset quantizes, without SmoothQuant and "
                                  f"bias correction (they cost it the floors: {measures(full_kept)}), the rest in "
                                  f"{precision} ({measures(plain_kept)})")
    candidates = _quantized_ops(plain, ov_model)
    if not candidates:
        raise BuildSkipped("int8-mixed: NNCF quantized no operation of this model")
    ranked = control.room(control.on_ranking(plain, plain_kept))  # on the ranking items, as each cost below
    cost = {n: control.room(control.kept(_in_float(plain, {n}, ov_model), ranking=True)) - ranked for n in candidates}
    order = sorted(candidates, key=lambda n: -cost[n])
    recipe = base > control.room(full_kept)  # plain: it keeps more of the floors
    tried: dict[int, tuple[object, dict[str, float]]] = {}  # k in float -> (the model, what it kept)

    def holds(k: int) -> bool:
        if k not in tried:
            mixed = _quantize(ov_model, model, options, ignored=tuple(order[:k]), plain=recipe)
            tried[k] = (mixed, control.kept(mixed))
        room = control.room(tried[k][1])
        log.debug("int8-mixed: %d of %d in float, room %.5f", k, len(order), room)
        return room >= 0
    hi = least_in_float(order, _shares(order, ov_model), precision, holds, control, full_kept, "int8-mixed")
    mixed, kept = tried[hi]
    how = " (without SmoothQuant and bias correction, which cost it more)" if recipe else ""
    return mixed, precision, layout(order, hi, precision, kept, "operations it reaches", how,
                                    lambda names: _short(names, paths))


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    ov = _ov()
    ov_model, source, paths = _convert(model, workdir)
    if not (options.quantize or options.precision != "fp32"):  # the plain variant: the others start from its IR
        (workdir / CONVERTED).write_text(json.dumps({"from": source, "paths": paths}))
    found = {}
    if options.quantize == "int8_mixed":
        ov_model, precision, words = _mixed(ov_model, model, options, paths)
        found = {"precision": precision, "layout": words}
    elif options.quantize in ("int8", "int8_transformer"):
        ov_model = _quantize(ov_model, model, options)
    ov.save_model(ov_model, str(workdir / "model.xml"), compress_to_fp16=False)  # the weights as they are
    (workdir / "export.onnx").unlink(missing_ok=True)
    return Artifact("openvino", ("model.xml", "model.bin"), options.found(converted_from=source, **found))


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
