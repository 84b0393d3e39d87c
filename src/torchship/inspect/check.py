"""check: the classic production mistakes, each with measured evidence and the fix.

Each check returns a Finding: ``found`` True (a mistake, with what was measured), False (checked,
fine) or None (does not apply here, with why). ``check`` runs them all.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .. import machine
from ..profile import batch_of


@dataclass
class Finding:
    check: str
    found: bool | None
    evidence: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _args(model, batch: int, seed: int = 0):
    feeds = batch_of(model.spec, model.eval_data, batch, model.dims) if seed == 0 else model.spec.sample(batch, model.dims, seed)
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in model.spec.input_names)


def _time(fn, *, min_runs: int = 5, seconds: float = 0.3) -> float:
    fn()
    times, stop = [], time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < stop:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return float(np.median(times))


def training_mode(model) -> Finding:
    name = "training mode at inference"
    module = model.module
    if not getattr(model, "was_training", False):
        return Finding(name, False, "the model is in eval mode")
    args = _args(model, 8)
    trained = copy.deepcopy(module).train()
    with torch.inference_mode():
        a, b = trained(*args)[0], module.eval()(*args)[0]
    diff = float((a.float() - b.float()).abs().max())
    layers = sorted({type(m).__name__ for m in module.modules() if isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm))})
    if diff == 0:
        return Finding(name, False, "the model is in training mode, but its outputs do not change (no dropout or batch norm)")
    return Finding(name, True, f"the model is in training mode: {', '.join(layers) or 'some layers'} change its outputs "
                   f"(max abs difference {diff:.3g} against eval() on the same batch)", "call model.eval() before serving")


def autograd(model) -> Finding:
    name = "autograd kept at inference"
    module, args = model.module, _args(model, 8)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args)
    if not any(o.requires_grad for o in out):
        return Finding(name, False, "a plain call records no autograd graph (no parameter requires grad)")

    def plain():
        module(*args)

    def inference():
        with torch.inference_mode():
            module(*args)
    t_grad, t_inf = _time(plain), _time(inference)
    return Finding(name, True, f"a plain call records an autograd graph: {saved[0] / 2**20:.2f} MiB of tensors saved for "
                   f"backward per batch of 8, {t_grad * 1e3:.2f} ms against {t_inf * 1e3:.2f} ms under inference_mode "
                   f"({t_grad / t_inf:.2f}x)", "run inference under torch.inference_mode() (torchship's runners do), "
                   "or model.requires_grad_(False)")


def batching(model) -> Finding:
    name = "one item at a time"
    module = model.module

    def rate(bs):
        args = _args(model, bs)
        with torch.inference_mode():
            return bs / _time(lambda: module(*args))
    one = rate(1)
    best_bs, best = max(((bs, rate(bs)) for bs in (8, 32)), key=lambda x: x[1])
    gain = best / one
    if gain < 1.5:
        return Finding(name, False, f"batching gains little here: {one:,.0f} items/s at batch 1, {best:,.0f} at batch {best_bs}")
    return Finding(name, True, f"batch 1 gives {one:,.0f} items/s, batch {best_bs} gives {best:,.0f} items/s ({gain:.1f}x)",
                   "batch requests: `torchship serve` batches dynamically (--max-batch-size, --max-queue-delay-us)")


def threads(model, workers: int) -> Finding:
    name = "thread oversubscription"
    cores, per = machine.cores(), torch.get_num_threads()
    if per * workers <= cores:
        return Finding(name, False, f"{workers} worker(s) x {per} intra-op threads <= {cores} cores")
    args = _args(model, 8)
    module = model.module

    def run(n):
        torch.set_num_threads(n)
        with torch.inference_mode():
            return _time(lambda: module(*args))
    over, fair = run(per), run(max(1, cores // workers))
    torch.set_num_threads(per)
    return Finding(name, True, f"{workers} workers x {per} intra-op threads = {per * workers} threads on {cores} cores; "
                   f"one worker's batch of 8 takes {over * 1e3:.2f} ms with {per} threads and {fair * 1e3:.2f} ms with "
                   f"{max(1, cores // workers)} (measured alone; under {workers} workers the oversubscribed threads also "
                   "contend with each other)", f"set torch.set_num_threads({max(1, cores // workers)}) per worker "
                   "(`torchship serve --workers N` does)")


def trace(model) -> Finding:
    name = "TorchScript trace with data-dependent control flow"
    import warnings

    from ..runtimes.torchscript import check_inputs, disagreement
    from ..runtimes._torch import example_args
    module = model.module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example_args(model), check_trace=False, strict=False)
    except Exception as exc:
        return Finding(name, None, f"does not apply: the model cannot be traced ({str(exc).splitlines()[0][:120]})")
    problem = disagreement(traced, module, check_inputs(model))
    if problem is None:
        return Finding(name, False, "a trace agrees with eager on inputs of other values and shapes")
    return Finding(name, True, f"a trace {problem}", "use torch.jit.script, torch.export, or `torchship optimize`, "
                   "which checks every trace and falls back to script")


def checkpoint(path: str | None) -> Finding:
    name = "checkpoint that needs unpickling"
    if not path:
        return Finding(name, None, "does not apply: no checkpoint given (--weights)")
    if path.endswith(".safetensors"):
        return Finding(name, False, f"{path} is safetensors: loading it runs no code")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        return Finding(name, True, f"{path} cannot be loaded with weights_only=True ({reason}): loading it means unpickling, "
                       "which can run any code its author put in it",
                       "save the state dict with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    return Finding(name, False, f"{path} loads with torch.load(weights_only=True): no arbitrary code runs")


def cudnn(model, device: str) -> Finding:
    name = "cudnn.benchmark off on CUDA"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return Finding(name, None, "does not apply: not running on CUDA")
    if model.spec.symbols:
        return Finding(name, None, f"does not apply: dynamic dimensions {model.spec.symbols} (benchmark mode re-tunes per shape)")
    module, args = copy.deepcopy(model.module).to(device).eval(), tuple(a.to(device) for a in _args(model, 32))

    def run(flag):
        torch.backends.cudnn.benchmark = flag
        with torch.inference_mode():
            return _time(lambda: (module(*args), torch.cuda.synchronize()))
    before = torch.backends.cudnn.benchmark
    off, on = run(False), run(True)
    torch.backends.cudnn.benchmark = before
    if before or off <= on * 1.05:
        return Finding(name, False, f"benchmark mode {'is on' if before else 'gains little'}: {off * 1e3:.2f} ms off, {on * 1e3:.2f} ms on")
    return Finding(name, True, f"fixed shapes with cudnn.benchmark off: {off * 1e3:.2f} ms per batch of 32, {on * 1e3:.2f} ms "
                   f"with it on ({off / on:.2f}x)", "set torch.backends.cudnn.benchmark = True at start-up")


def cuda_unused(model, device: str) -> Finding:
    name = "CUDA present but the model runs on the CPU"
    if not torch.cuda.is_available():
        return Finding(name, None, "does not apply: no CUDA device here")
    if device.startswith("cuda"):
        return Finding(name, False, "the model runs on CUDA")
    args = _args(model, 32)
    with torch.inference_mode():
        cpu = _time(lambda: model.module(*args))
        gpu_module = copy.deepcopy(model.module).cuda()
        gpu_args = tuple(a.cuda() for a in args)
        gpu = _time(lambda: (gpu_module(*gpu_args), torch.cuda.synchronize()))
    return Finding(name, True, f"{torch.cuda.get_device_name(0)} is idle: a batch of 32 takes {cpu * 1e3:.2f} ms on the CPU "
                   f"and {gpu * 1e3:.2f} ms on the GPU ({cpu / gpu:.1f}x)", "move the model and inputs to 'cuda' (--device cuda)")


def check(source, inputs: list[str] | None = None, *, weights: str | None = None, dims: dict | None = None,
          device: str = "cpu", workers: int = 1) -> list[Finding]:
    from ..errors import UsageError
    from ..sources import load_source
    model = load_source(source, inputs, weights=weights, dims=dims)
    if model.module is None:
        raise UsageError("check needs a PyTorch module; an ONNX file has nothing of this kind to check")
    return [training_mode(model), autograd(model), cudnn(model, device), batching(model), threads(model, workers),
            trace(model), checkpoint(weights), cuda_unused(model, device)]
