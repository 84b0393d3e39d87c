"""ONNX export + ONNX Runtime with full graph optimizations and explicit thread settings."""
from __future__ import annotations

import logging
import shutil
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BuildSkipped, first_line
from .base import Artifact, calibration_batches, register
from .control import Control, layout, least_in_float, measures, shares

if TYPE_CHECKING:
    from pathlib import Path

    from ..spec import IOSpec
    from .base import BuildOptions, LoadContext, Runner, Source


def _ort():
    import onnxruntime  # a core dependency
    return onnxruntime


def export_onnx(model, path) -> dict:
    """The model as ONNX at ``path``; returns the dimension ranges. The dynamo exporter starts from the same
    torch.export program the other runtimes use (``export_dynamic``); the TorchScript exporter is the fallback."""
    import torch

    from ._torch import example_args, export_dynamic
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    args = example_args(model, 2)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program, ranges = export_dynamic(model.module, args, model.spec)
            torch.onnx.export(program, args, str(path), dynamo=True, verbose=False, input_names=model.spec.input_names)
            return ranges
        except Exception as exc:
            errors.append(f"dynamo exporter: {str(exc).strip().splitlines()[0][:200]}")
        axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in model.spec.inputs}
        try:
            torch.onnx.export(model.module, args, str(path), dynamo=False, input_names=model.spec.input_names,
                              output_names=model.spec.output_names, dynamic_axes=axes, opset_version=17)
            return {}
        except Exception as exc:
            errors.append(f"TorchScript exporter: {str(exc).strip().splitlines()[0][:200]}")
    raise BuildSkipped("ONNX export failed: " + "; ".join(errors))


def save_onnx(source, target) -> tuple[str, ...]:
    """Write ``source`` as ``target``: one self-contained file, or ``target.data`` beside it past 2 GB."""
    import onnx
    proto = onnx.load(str(source))  # pulls in external data files, wherever they were written
    large = proto.ByteSize() > 2**31 - 2**20
    onnx.save_model(proto, str(target), save_as_external_data=large, location=target.name + ".data")
    return (target.name, target.name + ".data") if large else (target.name,)


def build(model: Source, options: BuildOptions, workdir: Path) -> Artifact:
    _ort()
    target = workdir / "model.onnx"
    if (model.converted or model.onnx_path) is not None:
        files = save_onnx(model.converted or model.onnx_path, target)
    else:
        raw = workdir / "export" / "model.onnx"
        raw.parent.mkdir()
        ranges = export_onnx(model, raw)
        files = save_onnx(raw, target)
        shutil.rmtree(raw.parent)
        if ranges:
            options = options.found(dim_ranges=ranges)
    if options.quantize == "dynamic_int8":
        files = _quantize(workdir, files, "dynamic", None)
    elif options.quantize == "static_int8":
        files = _quantize(workdir, files, "static", calibration_batches(model))
    elif options.quantize == "static_int8_mixed":
        files, layout = _mixed(workdir, files, model, options)
        options = options.found(layout=layout)
    return Artifact("onnxrt", files, options)


@contextmanager
def _aside(workdir: Path, files: tuple[str, ...]):
    """The plain model moved aside as ``fp32.onnx`` for a quantizer to read (it writes ``model.onnx``), and removed
    afterwards with its external data, whatever happened."""
    source = workdir / "fp32.onnx"
    (workdir / files[0]).rename(source)
    try:
        yield source
    finally:
        for path in [source] + [workdir / n for n in files[1:]]:
            path.unlink(missing_ok=True)


def _quantize(workdir, files, kind: str, batches) -> tuple[str, ...]:
    """ONNX Runtime int8: dynamic (int8 weights, activations quantized per call) or static (QDQ, activation
    ranges calibrated on ``batches``, per-channel weights).

    Weights take 7 bits (``reduce_range``): on an x86 CPU without VNNI, ONNX Runtime multiplies uint8 activations
    by int8 weights in pairs summed into int16, which saturates with full-range weights (a tiny MLP on AVX2 only:
    cosine to fp32 0.916; 7-bit 0.9999). A bundle is verified on one machine and served on others, so its weights
    keep to the range that holds on every x86 CPU, not only on the one that built it."""
    from onnxruntime import quantization as q
    prepared = workdir / "prepared.onnx"
    with _aside(workdir, files) as source:
        try:
            if kind == "dynamic":
                # per-channel weight scales: on MiniLM cosine to fp32 0.993 against 0.966 per-tensor, at the same speed
                q.quantize_dynamic(str(source), str(workdir / "model.onnx"), weight_type=q.QuantType.QInt8,
                                   per_channel=True, reduce_range=True)
            else:
                q.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
                _static(prepared, workdir / "model.onnx", batches)
        except Exception as exc:
            raise BuildSkipped(f"ONNX Runtime {kind} quantization failed: {first_line(exc, 200)}") from exc
        finally:
            prepared.unlink(missing_ok=True)
    return ("model.onnx",)


def _static(prepared: Path, target: Path, batches, excluded: tuple[str, ...] = (), ranges: Path | None = None) -> Path:
    """ONNX Runtime static int8 of ``prepared`` into ``target`` (QDQ, per-channel 7-bit weights, uint8 activations
    calibrated on ``batches``), the nodes ``excluded`` left in float; ``ranges``: a file the calibrated ranges are kept
    in and read back from (so that one calibration serves every layout)."""
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)
    q.quantize_static(str(prepared), str(target), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      reduce_range=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      nodes_to_exclude=list(excluded), calibration_cache_path=None if ranges is None else str(ranges))
    return target


class _Control(Control):
    """``control.Control`` for an ONNX model: an ONNX Runtime session on the CPU."""

    def compiled(self, path, precision: str):
        sess = session(path, threads=None)
        taken = {i.name for i in sess.get_inputs()}
        return lambda inputs: sess.run(None, {n: a for n, a in zip(self.names, inputs) if n in taken})[0]


_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _quantized_nodes(path: Path) -> list[str]:
    """The nodes of a QDQ model that run on int8: those with an input through a DequantizeLinear."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type not in _QDQ and any(i in dequantized for i in n.input)]


def _weight_shares(path: Path, names: list[str]) -> dict[str, float]:
    """Each node's share of the weights of the model's matrix multiplications and convolutions (their float
    initializers of two dimensions or more; what their FLOPs per item scale with)."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(path)).graph
    sizes = {i.name: int(np.prod(numpy_helper.to_array(i).shape)) for i in graph.initializer if len(i.dims) >= 2}
    weighted = ("MatMul", "Gemm", "Conv", "ConvTranspose")
    return shares({n.name: sum(sizes.get(i, 0) for i in n.input) for n in graph.node if n.op_type in weighted}, names)


def _mixed(workdir: Path, files: tuple[str, ...], model, options) -> tuple[tuple[str, ...], str]:
    """Static int8 with accuracy control: ONNX Runtime's static int8, and where it keeps less than the budget's floors
    (with ``control.MIXED_MARGIN`` spare) on the calibration data or on raw input, the nodes that cost the most left
    in fp32, as few as hold the floors. A node's cost: the room gained by leaving it alone out of int8 (one
    calibration serves every layout: the ranges are kept). (files, layout in words)."""
    from onnxruntime import quantization as q
    prepared, ranges = workdir / "prepared.onnx", workdir / "ranges.json"
    batches = calibration_batches(model)
    built: dict[tuple[str, ...], Path] = {}  # the nodes left in float -> the model quantized so
    kept: dict[tuple[tuple[str, ...], bool], dict[str, float]] = {}  # (those, on the ranking items only) -> measures
    with _aside(workdir, files) as source:
        try:
            q.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            control = _Control(prepared, model, options, "fp32")

            def quantized(excluded: tuple[str, ...], ranking: bool = False) -> dict[str, float]:
                if excluded not in built:
                    built[excluded] = _static(prepared, workdir / f"int8-{len(built)}.onnx", batches, excluded, ranges)
                if (excluded, ranking) not in kept:
                    kept[(excluded, ranking)] = control.kept(built[excluded], ranking)
                return kept[(excluded, ranking)]
            full_kept = quantized(())
            if control.room(full_kept) >= 0:
                raise BuildSkipped(f"static-int8-mixed: ONNX Runtime's static int8 keeps the floors by itself "
                                   f"({measures(full_kept)}): that model is onnxrt+static-int8")
            candidates = _quantized_nodes(built[()])
            if not candidates:
                raise BuildSkipped("static-int8-mixed: ONNX Runtime quantized no node of this model")
            base = control.room(control.on_ranking(built[()], full_kept))
            cost = {n: control.room(quantized((n,), ranking=True)) - base for n in candidates}
            order = sorted(candidates, key=lambda n: -cost[n])
            hi = least_in_float(order, _weight_shares(prepared, order), "fp32",
                                lambda k: control.room(quantized(tuple(order[:k]))) >= 0, control, full_kept,
                                "static-int8-mixed")
            built[tuple(order[:hi])].rename(workdir / "model.onnx")
            found = kept[(tuple(order[:hi]), False)]
        except BuildSkipped:
            raise
        except Exception as exc:
            raise BuildSkipped(f"ONNX Runtime static quantization failed: {first_line(exc, 200)}") from exc
        finally:
            for path in [prepared, ranges, *built.values()]:
                path.unlink(missing_ok=True)
    return ("model.onnx",), layout(order, hi, "fp32", found, "nodes it reaches")


def session(path, device="cpu", threads=None, optimize=True, spin=True):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    # spin=False: idle pool threads sleep instead of spinning (one spinning thread took ~0.8 of a core from a server)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BuildSkipped("onnxruntime has no CUDA execution provider here: pip install onnxruntime-gpu")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:
        raise BuildSkipped(f"ONNX Runtime cannot load the model: {first_line(exc, 240)}") from exc


SHRINK_ABOVE_BYTES = 8 * 2**20  # inputs this big: the memory arena gives back what the run grew it by


class OrtRunner:
    def __init__(self, sess, spec):
        self.sess, self.spec = sess, spec
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = spec.output_names or [o.name for o in sess.get_outputs()]
        self._shrink = None

    def __call__(self, feeds):
        feeds = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        # ONNX Runtime's arena keeps the peak of every run (a batch of 3,300 digits: +260 MB, for good); an unusually
        # big run shrinks it back (+100 MB left), while the usual batches keep the arena's speed
        big = sum(a.nbytes for a in feeds.values()) > SHRINK_ABOVE_BYTES
        outs = self.sess.run(None, feeds, self._shrink_options() if big else None)
        return dict(zip(self.output_names, outs))

    def _shrink_options(self):
        if self._shrink is None:
            self._shrink = _ort().RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return self._shrink


def load(artifact: Artifact, root: Path, spec: IOSpec, ctx: LoadContext) -> Runner:
    from ..safety import check_onnx
    check_onnx(root / artifact.files[0], set(artifact.files))  # external data only from the artifact's own files
    return OrtRunner(session(root / artifact.files[0], ctx.device, ctx.threads, True, ctx.spin), spec)


register("onnxrt", build, load, needs_torch=False)
