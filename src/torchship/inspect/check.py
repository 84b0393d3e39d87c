"""check: the classic production mistakes, each with measured evidence and the fix.

Each check returns a Finding whose status is ``found`` (a mistake, with what was measured), ``ok`` (checked, fine),
``inconclusive`` (the measured effect is inside the noise: no verdict either way) or ``n/a`` (does not apply here,
with why). Timings are interleaved rounds with intervals (``torchship.measure``); a finding that rests on a timing
is made only where the effect is beyond the noise. Every timed check takes a ``measure`` function, so tests give
it recorded measurements.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from .. import machine
from ..measure import Estimate, estimate, interleave
from ..profile import batch_of

Status = Literal["found", "ok", "inconclusive", "n/a"]
Measure = Callable[[Mapping[str, Callable[[], object]]], dict[str, Estimate]]


def timed(fns: Mapping[str, Callable[[], object]]) -> dict[str, Estimate]:
    """Seconds per call of each function: 7 interleaved rounds, about 50 ms each."""
    return {name: estimate(r) for name, r in interleave(fns, rounds=7, block_s=0.05, warmup=2).items()}


@dataclass
class Finding:
    check: str
    status: Status
    evidence: str
    fix: str = ""

    @property
    def found(self) -> bool:
        return self.status == "found"

    def to_dict(self) -> dict:
        return asdict(self)


def _ms(e: Estimate) -> str:
    return f"{e.median * 1e3:.3g} ms [{e.lo * 1e3:.3g}-{e.hi * 1e3:.3g}]"


def _ratio(slow: Estimate, fast: Estimate) -> tuple[float, float, float]:
    """(ratio of the medians, its lowest and highest over the two intervals): how many times ``fast`` is faster."""
    return slow.median / fast.median, slow.lo / fast.hi, slow.hi / fast.lo


def _args(model, batch: int, seed: int = 0):
    feeds = batch_of(model.spec, model.eval_data, batch, model.dims) if seed == 0 else model.spec.sample(batch, model.dims, seed)
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in model.spec.input_names)


def training_mode(model) -> Finding:
    name = "training mode at inference"
    module = model.module
    if not getattr(model, "was_training", False):
        return Finding(name, "ok", "the model is in eval mode")
    args = _args(model, 8)
    trained = copy.deepcopy(module).train()
    with torch.inference_mode():
        a, b = trained(*args)[0], module.eval()(*args)[0]
    diff = float((a.float() - b.float()).abs().max())
    layers = sorted({type(m).__name__ for m in module.modules() if isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm))})
    if diff == 0:
        return Finding(name, "ok", "the model is in training mode, but its outputs do not change (no dropout or batch norm)")
    return Finding(name, "found", f"the model is in training mode: {', '.join(layers) or 'some layers'} change its outputs "
                   f"(max abs difference {diff:.3g} against eval() on the same batch)", "call model.eval() before serving")


AUTOGRAD_MEMORY = 2**20  # bytes saved for backward per batch that count as a cost in themselves


def autograd(model, measure: Measure | None = None) -> Finding:
    name = "autograd kept at inference"
    module, args = model.module, _args(model, 8)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args)
    if not any(o.requires_grad for o in out):
        return Finding(name, "ok", "a plain call records no autograd graph (no parameter requires grad)")

    def inference():
        with torch.inference_mode():
            module(*args)
    t = (measure or timed)({"plain": lambda: module(*args), "inference_mode": inference})
    ratio, lo, hi = _ratio(t["plain"], t["inference_mode"])
    memory = f"{saved[0] / 2**20:.2f} MiB of tensors saved for backward per batch of 8"
    times = f"{_ms(t['plain'])} a call against {_ms(t['inference_mode'])} under inference_mode ({ratio:.2f}x"
    fix = "run inference under torch.inference_mode() (torchship's runners do), or model.requires_grad_(False)"
    if lo > 1:
        return Finding(name, "found", f"a plain call records an autograd graph: {memory}; {times}, beyond the noise)", fix)
    if saved[0] >= AUTOGRAD_MEMORY:
        side = "within the noise" if hi > 1 else "the plain call measured faster"
        return Finding(name, "found", f"a plain call records an autograd graph: {memory}; in time {times}, {side})", fix)
    return Finding(name, "inconclusive", f"a plain call records an autograd graph ({memory}), but what it costs is inside "
                   f"the noise: {times}, interval {lo:.2f}-{hi:.2f}x)", fix)


BATCH_GAIN = 1.5  # batching pays when items go through at least this much faster


def batching(model, measure: Measure | None = None) -> Finding:
    name = "one item at a time"
    module = model.module
    sizes = (1, 8, 32)
    args = {bs: _args(model, bs) for bs in sizes}

    def run(bs):
        def fn():
            with torch.inference_mode():
                module(*args[bs])
        return fn
    t = (measure or timed)({f"batch {bs}": run(bs) for bs in sizes})
    per_item = {bs: Estimate(t[f"batch {bs}"].median / bs, t[f"batch {bs}"].lo / bs, t[f"batch {bs}"].hi / bs,
                             t[f"batch {bs}"].rounds, t[f"batch {bs}"].samples) for bs in sizes}
    best = min(sizes[1:], key=lambda bs: per_item[bs].median)
    gain, lo, hi = _ratio(per_item[1], per_item[best])
    rate = lambda bs: f"{1 / per_item[bs].median:,.0f} items/s [{1 / per_item[bs].hi:,.0f}-{1 / per_item[bs].lo:,.0f}]"  # noqa: E731
    evidence = f"batch 1 gives {rate(1)}, batch {best} gives {rate(best)} ({gain:.1f}x, interval {lo:.1f}-{hi:.1f}x)"
    fix = "batch requests: `torchship serve` batches dynamically (--max-batch-size, --max-queue-delay-us)"
    if lo >= BATCH_GAIN:
        return Finding(name, "found", evidence, fix)
    if hi < BATCH_GAIN:
        return Finding(name, "ok", f"batching gains less than {BATCH_GAIN}x here: {evidence}")
    return Finding(name, "inconclusive", f"whether batching gains {BATCH_GAIN}x is inside the noise: {evidence}", fix)


def threads(model, workers: int, measure: Measure | None = None) -> Finding:
    name = "thread oversubscription"
    cores, per = machine.cores(), torch.get_num_threads()
    if per * workers <= cores:
        return Finding(name, "ok", f"{workers} worker(s) x {per} intra-op threads <= {cores} cores")
    args, module, fair = _args(model, 8), model.module, max(1, cores // workers)

    def run(n):
        def fn():
            torch.set_num_threads(n)
            with torch.inference_mode():
                module(*args)
        return fn
    try:
        t = (measure or timed)({f"{per} threads": run(per), f"{fair} threads": run(fair)})
    finally:
        torch.set_num_threads(per)
    return Finding(name, "found", f"{workers} workers x {per} intra-op threads = {per * workers} threads on {cores} cores; "
                   f"one worker's batch of 8 takes {_ms(t[f'{per} threads'])} with {per} threads and "
                   f"{_ms(t[f'{fair} threads'])} with {fair} (measured alone; under {workers} workers the oversubscribed "
                   "threads also contend with each other)", f"set torch.set_num_threads({fair}) per worker "
                   "(`torchship serve --workers N` does)")


def trace(model) -> Finding:
    name = "TorchScript trace with data-dependent control flow"
    import warnings

    from ..runtimes._torch import example_args
    from ..runtimes.torchscript import check_inputs, disagreement
    module = model.module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example_args(model), check_trace=False, strict=False)
    except Exception as exc:
        return Finding(name, "n/a", f"does not apply: the model cannot be traced ({str(exc).splitlines()[0][:120]})")
    problem = disagreement(traced, module, check_inputs(model))
    if problem is None:
        return Finding(name, "ok", "a trace agrees with eager on inputs of other values and shapes")
    return Finding(name, "found", f"a trace {problem}", "use torch.jit.script, torch.export, or `torchship optimize`, "
                   "which checks every trace and falls back to script")


def control_flow(model) -> Finding:
    """Where the forward branches on its values (found by dynamo), whether or not a trace of the sample inputs
    happens to disagree: no sampling proves a rare branch is never taken."""
    name = "control flow on the model's values"
    from ..flow import find_branches
    try:
        branches = find_branches(model.module.eval(), _args(model, 2))
    except Exception as exc:
        return Finding(name, "n/a", f"does not apply: dynamo cannot capture the model ({str(exc).splitlines()[0][:120]})")
    if not branches:
        return Finding(name, "ok", "the forward takes the same path whatever its inputs' values (branches on shapes only)")
    places = "; ".join(f"{b} ({b.reason})" for b in branches)
    return Finding(name, "found", f"the forward branches on its values at {places}: a traced or exported graph (ONNX, "
                   "OpenVINO, AOTInductor, TorchScript trace) keeps only the path its example took",
                   "remove the branch, write it with torch.cond / torch.while_loop (which exports keep), or, if it never "
                   "fires in production, accept the specialization (`torchship optimize --allow-specialization`); by "
                   "default optimize keeps such a model to eager, torch.compile and TorchScript script")


def checkpoint(path: str | None) -> Finding:
    name = "checkpoint that needs unpickling"
    if not path:
        return Finding(name, "n/a", "does not apply: no checkpoint given (--weights)")
    if path.endswith(".safetensors"):
        return Finding(name, "ok", f"{path} is safetensors: loading it runs no code")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        return Finding(name, "found", f"{path} cannot be loaded with weights_only=True ({reason}): loading it means "
                       "unpickling, which can run any code its author put in it",
                       "save the state dict with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    return Finding(name, "ok", f"{path} loads with torch.load(weights_only=True): no arbitrary code runs")


CUDNN_GAIN = 1.05


def cudnn(model, device: str, measure: Measure | None = None) -> Finding:
    name = "cudnn.benchmark off on CUDA"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return Finding(name, "n/a", "does not apply: not running on CUDA")
    if model.spec.symbols:
        return Finding(name, "n/a", f"does not apply: dynamic dimensions {model.spec.symbols} (benchmark mode re-tunes per shape)")
    if torch.backends.cudnn.benchmark:
        return Finding(name, "ok", "cudnn.benchmark is on")
    module, args = copy.deepcopy(model.module).to(device).eval(), tuple(a.to(device) for a in _args(model, 32))

    def run(flag):
        def fn():
            torch.backends.cudnn.benchmark = flag
            with torch.inference_mode():
                module(*args)
            torch.cuda.synchronize()
        return fn
    try:
        t = (measure or timed)({"off": run(False), "on": run(True)})
    finally:
        torch.backends.cudnn.benchmark = False
    gain, lo, hi = _ratio(t["off"], t["on"])
    evidence = f"a batch of 32 takes {_ms(t['off'])} with it off, {_ms(t['on'])} on ({gain:.2f}x, interval {lo:.2f}-{hi:.2f}x)"
    if lo >= CUDNN_GAIN:
        return Finding(name, "found", f"fixed shapes with cudnn.benchmark off: {evidence}",
                       "set torch.backends.cudnn.benchmark = True at start-up")
    if hi < CUDNN_GAIN:
        return Finding(name, "ok", f"benchmark mode gains little here: {evidence}")
    return Finding(name, "inconclusive", f"whether benchmark mode pays is inside the noise: {evidence}",
                   "set torch.backends.cudnn.benchmark = True at start-up")


def cuda_unused(model, device: str, measure: Measure | None = None) -> Finding:
    name = "CUDA present but the model runs on the CPU"
    if not torch.cuda.is_available():
        return Finding(name, "n/a", "does not apply: no CUDA device here")
    if device.startswith("cuda"):
        return Finding(name, "ok", "the model runs on CUDA")
    args = _args(model, 32)
    gpu_module = copy.deepcopy(model.module).cuda()
    gpu_args = tuple(a.cuda() for a in args)

    def cpu():
        with torch.inference_mode():
            model.module(*args)

    def gpu():
        with torch.inference_mode():
            gpu_module(*gpu_args)
        torch.cuda.synchronize()
    t = (measure or timed)({"cpu": cpu, "gpu": gpu})
    gain, lo, hi = _ratio(t["cpu"], t["gpu"])
    evidence = (f"a batch of 32 takes {_ms(t['cpu'])} on the CPU and {_ms(t['gpu'])} on {torch.cuda.get_device_name(0)} "
                f"({gain:.1f}x, interval {lo:.1f}-{hi:.1f}x)")
    if lo > 1:
        return Finding(name, "found", f"the GPU is idle: {evidence}", "move the model and inputs to 'cuda' (--device cuda)")
    if hi < 1:
        return Finding(name, "ok", f"the CPU is faster for this model: {evidence}")
    return Finding(name, "inconclusive", f"the GPU and the CPU are within the noise of each other: {evidence}")


def check(source, inputs: list[str] | None = None, *, weights: str | None = None, dims: dict | None = None,
          device: str = "cpu", workers: int = 1, measure: Measure | None = None) -> list[Finding]:
    from ..errors import UsageError
    from ..sources import load_source
    model = load_source(source, inputs, weights=weights, dims=dims)
    if model.module is None:
        raise UsageError("check needs a PyTorch module; an ONNX file has nothing of this kind to check")
    return [training_mode(model), autograd(model, measure), cudnn(model, device, measure), batching(model, measure),
            threads(model, workers, measure), trace(model), control_flow(model), checkpoint(weights),
            cuda_unused(model, device, measure)]
