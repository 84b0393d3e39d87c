"""A run's workspace: the verification inputs and their reference outputs, the model as a worker reloads it, the
worker processes and their build cache keys, and each variant's lineage."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import scratch
from ..mix import served_mix
from ..plan import VariantPlan
from ..results import Lineage
from ..verify import reference_outputs
from . import cache
from .data import Pool, verification_pool
from .options import OptimizeOptions
from .protocol import Job, ModelRef
from .workers import ForkServer, InlineWorker


class Workspace:
    """A run's temporary directory: the verification inputs and their reference outputs, the model as a worker
    reloads it, the fork server that starts the workers, and the trained models derived on the way."""

    def __init__(self, model, opts: OptimizeOptions, server: ForkServer | None = None):
        """``server``: a fork server started before the model was loaded (its imports overlap that), which the
        workspace takes over, or closes where only this process can run the model."""
        self.model, self.opts = model, opts
        self.root = scratch.make("optimize")
        self.server: ForkServer | None = None
        try:
            self.ref = self._model_ref(model)
            if self.ref is not None and opts.isolate:  # started now: its imports overlap the reference run below
                self.server, server = server or ForkServer(self.root / "forkserver.log"), None
            self.pool: Pool = verification_pool(model)
            self.chunk = min(32, max(opts.batch_sizes))
            np.savez(self.root / "pool.npz", **self.pool.inputs)
            # static int8 calibrates on the source's own representative inputs, else on the verification pool
            np.savez(self.root / "calibration.npz", **(model.calibration_data or self.pool.inputs))
            self.reference = reference_outputs(model, self.pool.inputs, self.chunk)
            self.extra, self.extra_items = self._extra_cases(model)
            self.raw = self._raw_cases(model)
            # the lengths every contender is timed at: given, or those of the user's own data (not generated inputs)
            self.mix = served_mix(model.spec, self.pool.inputs if model.eval_data is not None else {}, opts.lengths)
            self.threads = opts.threads or _cores()
            self.derived: dict[tuple, Any] = {}
            self.noise = None
            self._digests: dict[Path, bytes] = {}
            self._linear_share: float | None = None
        except BaseException:  # nothing is left running or on disk
            self.__exit__()
            raise
        finally:
            if server is not None:  # not taken over
                server.close()

    def _extra_cases(self, model) -> tuple[list[tuple[str, dict, dict]], dict[int, np.ndarray]]:
        """The inputs beyond the example with the reference's outputs on them (a case the reference itself cannot run
        is left out), written for the workers; and for the batch cases, their items' places in the pool."""
        from ..verify import extra_cases
        out, places = [], {}  # places: case -> its items' places in the pool, for the batch cases
        for label, feeds, items in extra_cases(model, self.pool.inputs if model.eval_data is not None else None,
                                               branch_cases=not self.opts.allow_specialization, items=self.pool.inputs):
            try:
                out.append((label, feeds, reference_outputs(model, feeds, len(next(iter(feeds.values()))))))  # whole
            except Exception:
                continue
            if items is not None:
                places[len(out) - 1] = items
        np.savez(self.root / "extra.npz", **{f"{i}|{k}": v for i, (_, feeds, _) in enumerate(out) for k, v in feeds.items()})
        return out, places

    def _raw_cases(self, model):
        """Raw input through the model's pipeline and the original library's answers on it, where the bundle will
        take raw input and its pipeline is right (``optimize.raw.cases``), written for the workers; else None."""
        if not self.opts.processing:
            return None
        from .raw import cases
        found = cases(model, self.root)
        if found is not None:
            np.savez(self.root / "raw.npz", **found.feeds)
        return found

    def _model_ref(self, model) -> ModelRef | None:
        """How a worker reloads the model, or None when only this process can run it."""
        common = dict(name=model.name, spec=model.spec, task=model.task, dims=dict(model.dims))
        if model.module is None:
            return ModelRef(kind="onnx", file=str(model.onnx_path), **common)
        keys = tuple(model.module.keys) if getattr(model.module, "keys", None) else None
        if model.arch is not None:
            from safetensors.torch import save_model
            weights = self.root / "reference.safetensors"
            save_model(model.module, str(weights))
            return ModelRef(kind="arch", arch=model.arch, weights=str(weights), **common)
        if model.file is not None:
            kind = "program" if model.file.suffix == ".pt2" else "torchscript"
            return ModelRef(kind=kind, file=str(model.file), keys=keys, by_keyword=model.module.by_keyword, **common)
        return None

    def job(self, vp: VariantPlan, ref: ModelRef) -> Job:
        from ..runtimes.base import DESCRIPTORS
        name = DESCRIPTORS[vp.runtime].converted  # what the plain variant converted: the others start from it
        converted = self.root / vp.runtime / name if name else None
        own = ref is self.ref and ref.kind != "onnx"  # the workspace's model, not one trained from it
        if not (own and vp.name != vp.runtime and converted is not None and converted.exists()):
            converted = None
        return Job(vp, ref, str(self.root / vp.name), str(self.root / "pool.npz"), str(self.root / "calibration.npz"),
                   self.chunk, self.threads, tuple(sys.path), self.cache_for(vp, ref), converted and str(converted),
                   str(self.root / "extra.npz") if self.extra else None,
                   # raw input is a verdict on candidates only: a reference row (eager-naive) is not run on it
                   str(self.root / "raw.npz") if self.raw is not None and vp.selectable else None)

    def cache_for(self, vp: VariantPlan, ref: ModelRef) -> str | None:
        """The build cache's directory for this build (``cache.key``), or None without a cache."""
        if not self.opts.cache or ref.kind == "arch" and ref.weights is None:
            return None
        data = (self.pool.inputs, self.model.calibration_data or self.pool.inputs) + ((self.raw.feeds,) if self.raw else ())
        return cache.key(vp, ref, self.threads, data, self._digests)

    def start(self, vp: VariantPlan, program: Path | None = None):
        """A worker for ``vp``: in its own process where the model can be reloaded there, else in this one."""
        ref = self.ref
        if program is not None:  # a model trained from this one: the worker loads that program instead
            ref = ModelRef(kind="program", file=str(program), name=self.model.name, spec=self.model.spec,
                           task=self.model.task, dims=dict(self.model.dims))
        if ref is None:  # an nn.Module given from Python with no architecture to rebuild it from
            return InlineWorker(self.job(vp, self._inline_ref()), self.model)
        if not self.opts.isolate:
            return InlineWorker(self.job(vp, ref), None)
        if self.server is None:
            self.server = ForkServer(self.root / "forkserver.log")
        return self.server.start(self.job(vp, ref))

    def linear_share(self) -> float:
        """The share of an eager forward pass (at the target batch size) spent in nn.Linear layers, measured once
        under forward hooks that only time (a pass to warm up, then the one measured); 1.0 where that cannot be
        measured (no module, no Linear leaves to hook)."""
        if self._linear_share is None:
            self._linear_share = 1.0
            if self.model.module is not None:
                import torch

                from ..hooks import watch
                from ..modules import to_torch
                from ..profile import batch_of
                args = to_torch(batch_of(self.model.spec, self.pool.inputs, self.opts.target, self.model.dims),
                                self.model.spec.input_names)
                with torch.inference_mode():
                    for _ in range(2):  # the last pass, warm
                        with watch(self.model.module, with_stats=False) as w:
                            self.model.module(*args)
                total = sum(layer.ms for layer in w.layers.values())
                linear = sum(layer.ms for layer in w.layers.values() if layer.type == "Linear")
                if total > 0 and any(layer.type == "Linear" for layer in w.layers.values()):
                    self._linear_share = linear / total
        return self._linear_share

    @staticmethod
    def lineage(vp: VariantPlan) -> Lineage:
        if vp.derived:
            return Lineage("model", f"{vp.derived[0]} (trained from the model), then {vp.runtime}")
        if vp.parent in (None, "model"):  # set by the plan
            return Lineage("model", vp.runtime)
        return Lineage(vp.parent, vp.note or vp.name)

    def pids(self) -> list[int]:
        return [self.server.proc.pid] if self.server is not None else []

    def _inline_ref(self) -> ModelRef:
        """The spec and dims of a model that only this process holds (the worker gets the model itself)."""
        m = self.model
        return ModelRef(kind="arch", name=m.name, spec=m.spec, task=m.task, dims=dict(m.dims))

    def __enter__(self) -> "Workspace":
        return self



    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        scratch.remove(self.root)


def _cores() -> int:
    from ..machine import cores
    return cores()
