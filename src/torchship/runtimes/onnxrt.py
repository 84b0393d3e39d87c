"""ONNX export + ONNX Runtime with full graph optimizations and explicit thread settings."""
from __future__ import annotations

import logging
import shutil
import warnings
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BuildSkipped, first_line
from .base import Artifact, calibration_batches, register

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
    if model.onnx_path is not None:
        files = save_onnx(model.onnx_path, target)
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
    return Artifact("onnxrt", files, options)


def _quantize(workdir, files, kind: str, batches) -> tuple[str, ...]:
    """ONNX Runtime int8: dynamic (int8 weights, activations quantized per call) or static (QDQ, activation
    ranges calibrated on ``batches``, per-channel weights).

    Weights take 7 bits (``reduce_range``): on an x86 CPU without VNNI, ONNX Runtime multiplies uint8 activations
    by int8 weights in pairs summed into int16, which saturates with full-range weights (a tiny MLP on AVX2 only:
    cosine to fp32 0.916; 7-bit 0.9999). A bundle is verified on one machine and served on others, so its weights
    keep to the range that holds on every x86 CPU, not only on the one that built it."""
    from onnxruntime import quantization as q
    source = workdir / "fp32.onnx"
    (workdir / files[0]).rename(source)
    try:
        if kind == "dynamic":
            # per-channel weight scales: on MiniLM cosine to fp32 0.993 against 0.966 per-tensor, at the same speed
            q.quantize_dynamic(str(source), str(workdir / "model.onnx"), weight_type=q.QuantType.QInt8, per_channel=True,
                               reduce_range=True)
        else:
            class Reader(q.CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(batches)

                def get_next(self):
                    return next(self.batches, None)
            prepared = workdir / "prepared.onnx"
            q.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            q.quantize_static(str(prepared), str(workdir / "model.onnx"), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, reduce_range=True, activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8)
            prepared.unlink()
    except Exception as exc:
        raise BuildSkipped(f"ONNX Runtime {kind} quantization failed: {first_line(exc, 200)}") from exc
    for name in files[1:]:  # external data of the fp32 model, if any
        (workdir / name).unlink(missing_ok=True)
    source.unlink()
    return ("model.onnx",)


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
