"""One variant's process: rebuild the model from its job, transform, build, load, run the verification inputs, then
time batches on request until told to stop.

``python -m torchship.optimize.job`` is the fork server: it imports torch once, then forks one worker per job it
is sent (a fork costs milliseconds; a fresh interpreter that imports torch costs about two seconds). A worker that
crashes or hangs costs its own variant only: the parent sees the connection close, or kills it at the timeout.
"""
from __future__ import annotations

import faulthandler
import os
import resource
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import msgspec
import numpy as np

from ..errors import BuildSkipped, first_line
from ..runtimes.base import BuildOptions
from ..spec import batches, concat_batches
from . import cache
from .protocol import Built, Job, ModelRef, Samples, Stop, TimeBatch, receive, send

PRELOAD = ("torch", "numpy", "safetensors.torch", "onnxruntime", "torchship.modules", "torchship.runtimes._torch",
           "torchship.transforms", "torchship.profile", "torch._dynamo", "torch._inductor", "onnxscript",
           "torchao.quantization")  # imported once here rather than once a worker: about 4 s of them


# --- the model, rebuilt without running it under hooks again -------------------------------------------------------

def reload(ref: ModelRef, pool: dict, calibration: dict | None):
    """The job's model as the parent had it: architecture + weights, a program or TorchScript file, or an ONNX file."""
    from ..sources.model import Model
    base = dict(task=ref.task, dims=dict(ref.dims), eval_data=pool, calibration_data=calibration)
    if ref.kind == "onnx":
        return Model(ref.name, None, ref.spec, onnx_path=Path(ref.file), **base)
    import torch
    from safetensors.torch import load_model

    from ..modules import Normalized, load_program, rebuild
    if ref.kind == "arch":
        module = rebuild(ref.arch, trust_code=True)  # the user's own source, named by the user
        load_model(module, ref.weights)
        return Model(ref.name, module.eval(), ref.spec, arch=ref.arch, **base)
    inner = load_program(Path(ref.file)) if ref.kind == "program" else torch.jit.load(ref.file, map_location="cpu")
    module = Normalized(inner, ref.spec.input_names, ref.keys, ref.by_keyword).eval()
    return Model(ref.name, module, ref.spec, file=Path(ref.file), **base)


def _transform(model, transforms, options: BuildOptions):
    """Weight-changing transforms now (the artifact stores their result); at-load ones go into the options (the
    options with them, returned)."""
    from dataclasses import replace

    from ..transforms import apply, from_dict, sparsity
    extra = {}
    for t in transforms:
        config = from_dict(t)
        if config.at_load:
            apply(model.module, config)  # fails here, with the reason, if it cannot apply
            options = options.found(transforms=(*options.transforms, t))
        else:
            model = replace(model, module=apply(model.module, config))
            extra["sparsity"] = sparsity(model.module)
    return model, extra, options


def cases(arrays: dict) -> dict[int, dict]:
    """``{"0|x": a, "1|x": b}`` -> ``{0: {"x": a}, 1: {"x": b}}``."""
    out: dict[int, dict] = {}
    for key, value in arrays.items():
        i, _, name = key.partition("|")
        out.setdefault(int(i), {})[name] = value
    return out


def _arrays(path: str | None) -> dict | None:
    if not path:
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class Variant:
    """A built and loaded variant: its runner and what the build measured."""

    def __init__(self, job: Job, model=None):
        self.job, self.model = job, model  # model: given in-process (inline), else rebuilt from the job
        self.runner = None
        self.device = job.variant.options.device

    def build(self) -> Built:
        import torch

        from ..runtimes import get
        from ..runtimes.base import LoadContext
        job = self.job
        torch.set_num_threads(job.threads)
        workdir = Path(job.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        pool = _arrays(job.pool)
        options = msgspec.structs.replace(job.variant.options, threads=job.threads)
        runtime = get(job.variant.runtime)
        try:
            from dataclasses import replace
            calibration = _arrays(job.calibration)
            if self.model is None:
                model = reload(job.model, pool, calibration)
            else:
                model = replace(self.model, eval_data=pool, calibration_data=calibration)
            if job.raw:
                model = replace(model, raw_data=_arrays(job.raw))
            if job.converted:  # converted once, by the runtime's plain variant
                model = replace(model, converted=Path(job.converted))
            t0 = time.perf_counter()
            cached = cache.get(job.cache, workdir)
            if cached is not None:
                artifact, build_s, extra = cached
            else:
                model, extra, options = _transform(model, job.variant.transforms, options)
                artifact = runtime.build(model, options, workdir)
                build_s = time.perf_counter() - t0
                cache.put(job.cache, workdir, artifact, build_s, extra)
            if self.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            self.runner = runtime.load(artifact, workdir, job.model.spec, LoadContext(self.device, job.threads, trust_code=True))
        except BuildSkipped as exc:
            return Built("skipped", str(exc))
        self.runner(next(batches(pool, min(8, job.chunk))))
        cold_start_s = time.perf_counter() - t0
        np.savez(workdir / "outputs.npz", **concat_batches([self.runner(b) for b in batches(pool, job.chunk)]))
        extra_outputs, extra_errors = self._beyond_the_example(workdir)
        raw_outputs, raw_error = self._raw(workdir)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return Built("ok", artifact=artifact, build_s=build_s, cold_start_s=cold_start_s,
                     artifact_bytes=sum((workdir / f).stat().st_size for f in artifact.files), peak_memory_mb=peak,
                     peak_memory_kind="cuda allocated" if self.device.startswith("cuda") else "process RSS",
                     outputs=str(workdir / "outputs.npz"), sparsity=extra.get("sparsity"), cached=cached is not None,
                     extra_outputs=extra_outputs, extra_errors=extra_errors, raw_outputs=raw_outputs, raw_error=raw_error)

    def _beyond_the_example(self, workdir: Path):
        """The outputs on the job's other inputs (batch 1, other shapes, scaled values), and the cases that raised."""
        if not self.job.extra:
            return None, {}
        outs, errors = {}, {}
        for i, feeds in sorted(cases(_arrays(self.job.extra)).items()):
            try:
                outs.update({f"{i}|{k}": v for k, v in self.runner(feeds).items()})
            except Exception as exc:  # a graph fixed to the example's shape: a reason, not a crash
                errors[i] = first_line(exc, 200)
        np.savez(workdir / "extra_out.npz", **outs)
        return str(workdir / "extra_out.npz"), errors

    def _raw(self, workdir: Path) -> tuple[str | None, str | None]:
        """The outputs on raw input through the bundle's pipeline (one batch of mixed lengths), or why it raised."""
        if not self.job.raw:
            return None, None
        try:
            outs = self.runner(_arrays(self.job.raw))
        except Exception as exc:
            return None, first_line(exc, 200)
        np.savez(workdir / "raw_out.npz", **outs)
        return str(workdir / "raw_out.npz"), None

    def time(self, request: TimeBatch) -> Samples:
        """``request.runs`` timed calls at one batch size (after ``request.warmup`` untimed ones). With a mix, a call
        is one batch at each of its sizes, timed apart, and counts as their weighed sum."""
        from ..mix import cut
        from ..profile import batch_of
        spec, mix = self.job.model.spec, request.mix
        try:
            feeds = batch_of(spec, _arrays(self.job.pool), request.batch, self.job.model.dims)
            runs = [(1.0, feeds)] if mix is None else [(w, cut(spec, feeds, mix.dim, s)) for s, w in zip(mix.sizes, mix.weights)]
            sync = _synchronize(self.device)
            if request.pause_s:
                time.sleep(request.pause_s)
            warm, n = time.perf_counter() + request.warmup_s, 0
            while n < request.warmup or (request.warmup_s and time.perf_counter() < warm):
                for _, f in runs:
                    self.runner(f)
                n += 1
            sync()
            return timed_calls(self.runner, runs, request, sync, time.perf_counter)
        except Exception as exc:  # e.g. batch norm in training mode at batch 1: an error for this batch size
            return Samples(request.batch, (), first_line(exc, 200))


def timed_calls(runner, runs: list[tuple[float, dict]], request: TimeBatch, sync, clock) -> Samples:
    """At least ``request.runs`` calls, more while ``request.seconds`` last; a call runs each of ``runs`` (weight,
    feeds) once, timed apart, and counts as their weighed sum (one run of weight 1 without a mix)."""
    mix = request.mix
    times, each, deadline = [], [[] for _ in runs], clock() + request.seconds
    while len(times) < request.runs or (len(times) < request.max_runs and clock() < deadline):
        total = 0.0
        for k, (w, feeds) in enumerate(runs):
            t0 = clock()
            runner(feeds)
            sync()
            each[k].append(clock() - t0)
            total += w * each[k][-1]
        times.append(total)
    return Samples(request.batch, tuple(times), by_size={} if mix is None else {s: tuple(e) for s, e in zip(mix.sizes, each)})


def _synchronize(device: str):
    if device.startswith("cuda"):
        import torch
        return torch.cuda.synchronize
    return lambda: None


def serve_one(conn: socket.socket, job: Job) -> None:
    """A worker's life: build, report, then time batches until told to stop."""
    variant = Variant(job)
    try:
        built = variant.build()
    except Exception as exc:
        import traceback
        traceback.print_exc()
        built = Built("failed", first_line(exc))
    send(conn, built)
    if built.status != "ok":
        return
    while True:
        request = receive(conn, TimeBatch | Stop)
        if request is None or isinstance(request, Stop):
            return
        send(conn, variant.time(request))


# --- the fork server ------------------------------------------------------------------------------------------------

def _child(conn: socket.socket, job: Job) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the compilers a build runs are waited for
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setpgid(0, 0)  # its own process group: a timeout kills the compilers it started too
    log = os.open(os.path.join(job.workdir, "worker.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    faulthandler.enable(sys.stderr)  # a crash in native code leaves its traceback in worker.log
    warnings.filterwarnings("ignore")
    sys.path[:] = list(job.sys_path)
    serve_one(conn, job)


def _leave() -> None:
    """The fork server's exit, without the interpreter's teardown of torch and the rest it preloaded (a second, which
    the parent's close waits for: once a search): it holds nothing to save."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """Fork server: read (job, socket) from the control socket on fd 3; fork a worker for each; answer its pid."""
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional one (torchao: the compress extra)
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished workers are reaped by the kernel
    control = socket.socket(fileno=int(sys.argv[1]))
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 1 << 20, 1)
        except OSError:
            data = b""
        if not data:  # the parent went away: every worker it still has goes with its connection
            _leave()
        job = msgspec.msgpack.decode(data, type=Job)
        os.makedirs(job.workdir, exist_ok=True)
        pid = os.fork()
        if pid == 0:
            control.close()
            try:
                _child(socket.socket(fileno=fds[0]), job)
            finally:
                os._exit(0)
        os.close(fds[0])
        control.sendall(pid.to_bytes(8, "little"))


if __name__ == "__main__":
    main()
