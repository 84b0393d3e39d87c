"""optimize: load -> plan -> build/verify/profile each variant (own process) -> select -> bundle + report."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import bundle
from .errors import SpecError, UsageError
from .plan import VariantPlan, plan
from .select import closest, select
from .sources import Model, load_source
from .verify import Budget, compare

POOL_LIMIT = 256


@dataclass(frozen=True)
class OptimizeOptions:
    device: str = "cpu"
    budget: Budget = field(default_factory=Budget)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    target_batch_size: int | None = None  # default: the largest batch size
    latency_slo_ms: float | None = None
    runtimes: tuple[str, ...] | None = None
    threads: int | None = None  # intra-op threads, as serving will use; default: all cores
    timeout_s: float = 600.0
    seconds_per_size: float = 1.0
    isolate: bool = True  # each variant in its own process
    transforms: tuple[str, ...] = ("int8", "bf16", "qat", "channels", "distill")  # see plan.TRANSFORMS
    train_epochs: int | None = None  # for the trained variants (qat, channels, distill); default: per kind

    def __post_init__(self):
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.target_batch_size is not None and self.target_batch_size not in self.batch_sizes:
            raise UsageError(f"target batch size {self.target_batch_size} is not among --batch-sizes {list(self.batch_sizes)}")
        if self.train_epochs is not None and self.train_epochs < 1:
            raise UsageError(f"--train-epochs must be at least 1, got {self.train_epochs}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"--device {self.device!r}: use cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")

    @property
    def target(self) -> int:
        return self.target_batch_size or max(self.batch_sizes)


@dataclass
class OptimizeResult:
    model: str
    variants: list[dict]
    chosen: dict | None
    chosen_batch_size: int | None
    bundle: Path | None
    report: Path | None
    machine: dict
    message: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bundle"], d["report"] = str(self.bundle) if self.bundle else None, str(self.report) if self.report else None
        return d


Progress = Callable[[str, int, int], None]


def machine_info(threads: int | None = None) -> dict:
    from .machine import cores, cpu as cpu_info
    cpu, flags = cpu_info()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    import onnxruntime
    return {"cpu": cpu, "cores": cores(), "isa": isa, "threads": threads or cores(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def read_arrays(data, spec, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs named as the IOSpec's (and optional ``labels``) from a .npz or .safetensors file or a dict of arrays."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            if path.suffix == ".safetensors":
                from safetensors.numpy import load_file
                arrays = load_file(str(path))
            else:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise UsageError(f"--{what} {path}: not a readable .npz or .safetensors file ({str(exc).splitlines()[0]})") from exc
    else:
        arrays = {k: np.asarray(v) for k, v in dict(data).items()}
    labels = arrays.pop("labels", None)
    try:
        n = spec.check(arrays)
    except SpecError as exc:
        raise UsageError(f"--{what} does not fit the model's inputs: {exc}") from exc
    if labels is not None and len(labels) != n:
        raise UsageError(f"--{what}: {len(labels)} labels for {n} items")
    return arrays, labels


def verification_pool(model: Model) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    if model.eval_data is not None:
        n = min(POOL_LIMIT, len(next(iter(model.eval_data.values()))))
        labels = model.labels[:n] if model.labels is not None else None
        return {k: np.ascontiguousarray(v[:n]) for k, v in model.eval_data.items()}, labels, f"{n} held-out items"
    return model.spec.sample(64, model.dims, seed=123), None, "64 items generated from the IOSpec"


def reference_outputs(model: Model, pool: dict, chunk: int) -> dict[str, np.ndarray]:
    """Eager fp32 (or, for an ONNX source, ONNX Runtime with every optimization off)."""
    if model.module is None:
        from .runtimes.onnxrt import OrtRunner, session
        runner = OrtRunner(session(model.onnx_path, optimize=False), model.spec)
    else:
        from .runtimes.base import TorchRunner
        runner = TorchRunner(model.module.eval(), model.spec)
    n = len(next(iter(pool.values())))
    parts = [runner({k: v[i:i + chunk] for k, v in pool.items()}) for i in range(0, n, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _job(model: Model, vp: VariantPlan, opts: OptimizeOptions, root: Path, pool_path: Path, chunk: int, weights) -> dict:
    return {"runtime": vp.runtime, "options": {**vp.options}, "transforms": list(vp.transforms),
            "workdir": str(root / vp.name), "pool": str(pool_path), "calibration": str(root / "calibration.npz"),
            "chunk": chunk, "batch_sizes": list(opts.batch_sizes), "seconds": opts.seconds_per_size, "threads": opts.threads,
            "model": {"name": model.name, "spec": model.spec.to_dict(), "task": model.task, "dims": model.dims,
                      "arch": model.arch, "weights": str(weights) if weights else None,
                      "onnx_path": str(model.onnx_path) if model.onnx_path else None,
                      "source": model.source, "inputs": [str(t) for t in model.spec.inputs]}}


def _run_isolated(job: dict, timeout: float) -> dict:
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(workdir / "worker.log", "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "torchship._worker", str(workdir / "job.json")],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=os.getcwd())
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout:.0f}s (raise --timeout to wait longer)"}
    result_file = workdir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    tail = [l for l in (workdir / "worker.log").read_text(errors="replace").splitlines() if l.strip()][-1:]
    return {"status": "failed", "reason": f"worker exited with code {proc.returncode}: {tail[0][:300] if tail else 'no output'}"}


def _run_inline(job: dict) -> dict:
    from . import _worker
    try:
        return _worker.run(job)
    except Exception as exc:
        return {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"}


def _derive(model: Model, key: tuple, data, root: Path, student, epochs):
    """(program, training summary), or the one line saying why this trained variant cannot be made."""
    from .transforms.trained import derive
    from .errors import TorchshipError
    kind, level = key
    try:
        return derive(model, kind, level, data, root / "derived" / f"{kind}{level or ''}", student=student, epochs=epochs)
    except TorchshipError as exc:
        return str(exc)
    except Exception as exc:  # a crash in training or export costs this variant only
        return f"training failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def _compressed(r: dict) -> bool:
    return bool(r.get("transforms") or r.get("derived") or "quantize" in r.get("options", {})
                or r.get("options", {}).get("precision", "fp32") != "fp32")


def _ratios(results: list[dict], target: int) -> None:
    """Throughput against eager and the best fp32 variant; for a compressed variant, what it bought over the same
    runtime without it (throughput and artifact size)."""
    def tput(r):
        return ((r.get("profile") or {}).get(str(target)) or {}).get("throughput")
    eager = next((tput(r) for r in results if r["name"] == "eager" and r["status"] in ("ok", "rejected")), None)
    best = max((tput(r) for r in results if r["status"] == "ok" and r["selectable"] and not _compressed(r) and tput(r)),
               default=None)
    plain = {r["runtime"]: r for r in results if r["name"] == r["runtime"] and r["status"] in ("ok", "rejected")}
    for r in results:
        t, base = tput(r), plain.get(r["runtime"])
        r["vs_eager"] = t / eager if t and eager else None
        r["vs_best_fp32"] = t / best if t and best else None
        if _compressed(r) and base is not None and t and tput(base):
            r["vs_runtime"] = t / tput(base)
            r["size_vs_runtime"] = r["artifact_bytes"] / base["artifact_bytes"] if base.get("artifact_bytes") else None


def optimize(source, options: OptimizeOptions | None = None, *, inputs: list[str] | None = None,
             weights: str | None = None, dims: dict | None = None, out: str | Path | None = None,
             name: str | None = None, progress: Progress | None = None, eval_data=None, calibration_data=None,
             train_data=None, student=None, warn: Callable[[str], None] | None = None) -> OptimizeResult:
    """Build every applicable variant of ``source``, verify, profile, select and (with ``out``) bundle it.

    ``eval_data``: held-out inputs (and ``labels`` for a task metric) to verify on, a .npz/.safetensors path or a
    dict; ``calibration_data``: representative inputs for static int8. Data that does not fit the model is one
    line through ``warn`` and the run goes on with the source's own data (or generated inputs).
    ``train_data`` (as ``torchship train`` takes it) adds variants trained from the model: QAT, channel pruning
    with fine-tuning, and distillation into ``student`` (package.module:attr or an nn.Module; the zoo knows its own)."""
    opts = options or OptimizeOptions()
    say = progress or (lambda msg, i, n: None)
    warn = warn or (lambda line: warnings.warn(line, stacklevel=2))
    if out is not None:
        bundle.check_writable(Path(out))
    say("loading the model", 0, 1)
    model = load_source(source, inputs, weights=weights, dims=dims)
    model.name = name or model.name
    for what, data in (("eval-data", eval_data), ("calibration-data", calibration_data)):
        if data is None:
            continue
        try:
            arrays, labels = read_arrays(data, model.spec, what)
        except UsageError as exc:
            warn(f"{exc}; going on without it")
            continue
        if what == "eval-data":
            model.eval_data, model.labels = arrays, labels
        else:
            model.calibration_data = arrays
    if train_data is not None:
        from .train.data import load_data
        try:
            load_data(train_data)
        except UsageError as exc:
            warn(f"--train-data: {exc}; going on without the trained variants")
            train_data = None
    if model.source is None and isinstance(source, (str, Path)) and model.arch is None:
        model.source = str(source)
    variants = plan(model, opts.device, list(opts.runtimes) if opts.runtimes else None, opts.threads, opts.transforms,
                    trainable=train_data is not None)
    isolate = opts.isolate and (model.arch is not None or model.source is not None or model.onnx_path is not None)
    root = Path(tempfile.mkdtemp(prefix="torchship-"))
    try:
        pool, labels, pool_note = verification_pool(model)
        chunk = min(32, max(opts.batch_sizes))
        pool_path = root / "pool.npz"
        np.savez(pool_path, **pool)
        # static int8 calibrates on the source's own representative inputs, else on the verification pool
        np.savez(root / "calibration.npz", **(model.calibration_data or pool))
        reference = reference_outputs(model, pool, chunk)
        weights_path = None
        if model.arch is not None:
            from safetensors.torch import save_model
            weights_path = root / "reference.safetensors"
            save_model(model.module, str(weights_path))
        results, failed_level, derived = [], {}, {}
        for i, vp in enumerate(variants):
            gentler_failed = vp.family and failed_level.get(vp.family, vp.level + 1) < vp.level
            skip = vp.options.get("skip") or (gentler_failed and f"not tried: a gentler {vp.family} variant failed the budget")
            if vp.derived and not skip:
                if vp.derived not in derived:
                    say(f"training {vp.name.partition('+')[2]}", i, len(variants))
                    derived[vp.derived] = _derive(model, vp.derived, train_data, root, student, opts.train_epochs)
                skip = derived[vp.derived] if isinstance(derived[vp.derived], str) else None
            if skip:
                results.append({"status": "skipped", "name": vp.name, "runtime": vp.runtime, "options": vp.options,
                                "selectable": vp.selectable, "note": vp.note, "transforms": list(vp.transforms), "reason": skip})
                continue
            say(f"building and timing {vp.name}", i, len(variants))
            job = _job(model, vp, opts, root, pool_path, chunk, weights_path)
            if vp.derived:  # the worker loads the trained program instead of the original
                program, training = derived[vp.derived]
                job["model"].update(arch=None, weights=None, source=str(program), outputs=list(model.spec.output_names))
            t0 = time.perf_counter()
            res = _run_isolated(job, opts.timeout_s) if isolate else _run_inline(job)
            res.update(name=vp.name, runtime=vp.runtime, options={k: v for k, v in vp.options.items() if v is not None},
                       selectable=vp.selectable, note=vp.note, transforms=list(vp.transforms), wall_s=time.perf_counter() - t0)
            if vp.derived:
                res.update(derived=vp.derived[0], training=training)
            if res["status"] == "ok":
                with np.load(res.pop("outputs"), allow_pickle=False) as z:
                    outs = {k: z[k] for k in z.files}
                fid = compare(reference, outs, opts.budget, model.task, labels)
                res["fidelity"] = fid.to_dict()
                if not fid.passed:
                    res["status"], res["reason"] = "rejected", fid.reason
            if res["status"] == "rejected" and vp.family:
                failed_level.setdefault(vp.family, vp.level)
            results.append(res)
        say("selecting", len(variants), len(variants))
        _ratios(results, opts.target)
        picked = select(results, opts.target, opts.latency_slo_ms)
        machine = machine_info(opts.threads)
        if picked is None:
            near = closest(results)
            message = "no variant met the budget" + (f" at p99 <= {opts.latency_slo_ms} ms" if opts.latency_slo_ms else "")
            if near:
                message += f"; closest: {near['name']} ({near['reason']})"
            chosen, chosen_bs = None, None
        else:
            chosen, chosen_bs = picked
            chosen["selected"] = True
            message = f"chose {chosen['name']} at batch size {chosen_bs}"
        result = OptimizeResult(model.name, results, chosen, chosen_bs, None, None, machine, message)
        meta = {"budget": opts.budget.to_dict(), "verification": pool_note, "batch_sizes": list(opts.batch_sizes),
                "target_batch_size": opts.target, "latency_slo_ms": opts.latency_slo_ms, "device": opts.device,
                "spec": model.spec.to_dict(), "task": model.task, "dims": model.dims}
        if out is not None and chosen is not None:
            say("writing the bundle and report", len(variants), len(variants))
            _package(result, meta, root, Path(out))
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _package(result: OptimizeResult, meta: dict, root: Path, out: Path) -> None:
    from .report import write_report
    report_dir = root / "report"
    write_report(result, meta, report_dir)
    files = [(p, f"report/{p.name}") for p in sorted(report_dir.iterdir())]
    c = result.chosen
    files += [(root / c["name"] / f, f) for f in c["artifact"]["files"]]
    manifest = {
        "name": result.model, "version": "1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__, "spec": meta["spec"], "task": meta["task"], "dims": meta["dims"],
        "variant": c["name"], "runtime": c["runtime"], "transforms": c.get("transforms", []), "device": meta["device"],
        "threads": result.machine["threads"], "artifact": c["artifact"], "max_batch_size": result.chosen_batch_size,
        "budget": meta["budget"], "fidelity": c["fidelity"], "profile": c["profile"],
        "cold_start_s": c["cold_start_s"], "artifact_bytes": c["artifact_bytes"], "machine": result.machine,
    }
    result.bundle = bundle.write(out, manifest, files)
    result.report = result.bundle / "report" / "report.md"
