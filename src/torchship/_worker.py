"""Build, load, verify-run and profile one variant; run as ``python -m torchship._worker JOB.json``.

Each variant runs in its own process with a timeout, so a backend that crashes or hangs
becomes a rejected row with its reason instead of a failed run.
"""
from __future__ import annotations

import json
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from .errors import BuildSkipped
from .machine import cores


def _reload(job: dict, pool: dict):
    from safetensors.torch import load_model

    from .sources import Model, load_source, rebuild
    from .spec import IOSpec
    m = job["model"]
    spec = IOSpec.from_dict(m["spec"])
    if m.get("arch"):
        module = rebuild(m["arch"])
        load_model(module, m["weights"])
        return Model(m["name"], module.eval(), spec, m["task"], m["arch"], pool, None, m["dims"])
    if m.get("onnx_path"):
        return Model(m["name"], None, spec, m["task"], None, pool, None, m["dims"], Path(m["onnx_path"]))
    model = load_source(m["source"], m.get("inputs"), dims=m["dims"], outputs=m.get("outputs"))
    model.eval_data = pool
    return model


def _transform(model, transforms: list[dict], options: dict) -> dict:
    """Weight-changing transforms now (the artifact stores their result); at-load ones go into the options."""
    from .transforms import apply, from_dict, sparsity
    extra = {}
    for t in transforms:
        config = from_dict(t)
        if config.at_load:
            apply(model.module, config)  # fails here, with the reason, if it cannot apply
            options.setdefault("transforms", []).append(t)
        else:
            model.module = apply(model.module, config)
            extra["sparsity"] = sparsity(model.module)
    return extra


def _chunks(feeds: dict, size: int):
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in feeds.items()}


def run(job: dict) -> dict:
    """Everything one variant needs; returns the result dict (status ok or skipped)."""
    import torch

    from . import runtimes
    from .profile import profile
    from .spec import IOSpec
    threads = job.get("threads") or cores()
    torch.set_num_threads(threads)
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    with np.load(job["pool"], allow_pickle=False) as z:
        pool = {k: z[k] for k in z.files}
    runtime = runtimes.get(job["runtime"])
    options = {**job["options"], "threads": threads}
    try:
        model = _reload(job, pool)
        if job.get("calibration") and Path(job["calibration"]).exists():
            with np.load(job["calibration"], allow_pickle=False) as z:
                model.calibration_data = {k: z[k] for k in z.files}
        t0 = time.perf_counter()
        extra = _transform(model, job.get("transforms") or [], options)
        artifact = runtime.build(model, options, workdir)
        build_s = time.perf_counter() - t0
        spec, device = IOSpec.from_dict(job["model"]["spec"]), options.get("device", "cpu")
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        runner = runtime.load(artifact, workdir, spec, device)
    except BuildSkipped as exc:
        return {"status": "skipped", "reason": str(exc)}
    runner(next(_chunks(pool, min(8, job["chunk"]))))
    cold_start_s = time.perf_counter() - t0
    outputs = [runner(chunk) for chunk in _chunks(pool, job["chunk"])]
    merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    np.savez(workdir / "outputs.npz", **merged)
    prof = profile(runner, spec, job["batch_sizes"], pool, job["model"]["dims"], job.get("seconds", 1.0))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"status": "ok", "artifact": artifact.to_dict(), "build_s": build_s, "cold_start_s": cold_start_s,
            "artifact_bytes": sum((workdir / f).stat().st_size for f in artifact.files),
            "peak_memory_mb": peak, "peak_memory_kind": "cuda allocated" if device.startswith("cuda") else "process RSS",
            "profile": {str(k): v for k, v in prof.items()}, "outputs": str(workdir / "outputs.npz"), **extra}


def main(path: str) -> int:
    job = json.loads(Path(path).read_text())
    warnings.filterwarnings("ignore")
    try:
        result = run(job)
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"}
    Path(job["workdir"], "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
