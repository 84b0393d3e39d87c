"""optimize: every applicable way of running a model, verified and timed, the fastest faithful one packaged.

The pipeline, one named step each:

    model    = load(source, ...)          the model and the user's data (sources, optimize.data)
    model    = with_branches(model)       where it branches on its values, found once (flow)
    variants = plan(model, ...)           runtime x transforms (plan); traced ones skipped for such a model
    results  = build_each(variants, ...)  each in its own process: build, load, run the verification inputs, time
                                          (optimize.workers, optimize.job); checked against eager fp32 (verify)
    chosen   = select(results, ...)       the fastest within budget (select)
    result   = with_processing(result, ...)  raw input and answers, checked end to end (optimize.raw, processing)
    bundle   = package(result, ...)       manifest + artifact + report (bundle, report)
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np

from .. import bundle
from ..errors import UsageError, first_line
from ..plan import VariantPlan, plan
from ..results import Lineage, VariantResult
from ..measure import Noise
from ..select import Decision, closest, select
from ..verify import Budget, reference_outputs
from . import cache
from .data import Pool, checked_train_data, verification_pool, with_data
from .protocol import Job, ModelRef
from .raw import with_image_processor, with_processing, with_tokenizer
from .search import Search
from .workers import ForkServer, InlineWorker

__all__ = ["OptimizeOptions", "OptimizeResult", "optimize"]


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
    seconds_per_size: float = 0.5  # timing per variant and batch size, spread over the rounds
    isolate: bool = True  # each variant in its own process
    transforms: tuple[str, ...] = ("int8", "bf16", "qat", "channels", "distill")  # see plan.TRANSFORMS
    train_epochs: int | None = None  # for the trained variants (qat, channels, distill); default: per kind
    time_budget_s: float | None = None  # the whole search; builds stop at 3/4 of it (once a candidate is built), timing rounds at all of it
    exhaustive: bool = False  # build compressed variants even where their runtime is too far behind to win
    cache: bool = True  # reuse builds of the same model, weights, data and options (TORCHSHIP_CACHE/builds)
    processing: bool = True  # package the text pipeline (tokenizer.json) where the source has one, checked end to end
    allow_specialization: bool = False  # a model that branches on its values: traced/exported variants compete anyway

    def __post_init__(self):
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.target_batch_size is not None and self.target_batch_size not in self.batch_sizes:
            raise UsageError(f"target batch size {self.target_batch_size} is not among --batch-sizes {list(self.batch_sizes)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UsageError(f"--time-budget must be a positive number of seconds, got {self.time_budget_s}")
        if self.seconds_per_size <= 0:
            raise UsageError(f"seconds per batch size must be positive, got {self.seconds_per_size}")
        if self.train_epochs is not None and self.train_epochs < 1:
            raise UsageError(f"--train-epochs must be at least 1, got {self.train_epochs}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"--device {self.device!r}: use cpu or cuda")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")

    @property
    def target(self) -> int:
        return self.target_batch_size or max(self.batch_sizes)


@dataclass(frozen=True)
class OptimizeResult:
    model: str
    variants: tuple[VariantResult, ...]
    chosen: VariantResult | None
    chosen_batch_size: int | None
    machine: dict[str, Any]
    message: str
    options: OptimizeOptions
    verification: str  # what the variants were verified on
    spec: Any = None  # the model's IOSpec
    task: str = "other"
    dims: dict[str, int] = field(default_factory=dict)
    labelled: bool = False  # the verification inputs had labels (an accuracy budget can be the measure)
    decision: Decision | None = None  # why the chosen variant won, in figures and words
    noise: Noise | None = None  # how quiet the machine was while timing
    notes: tuple[str, ...] = ()  # what the user should know about the model as given (training mode, ...)
    wall_s: float | None = None  # how long the search took
    branches: tuple = ()  # flow.Branch: where the model branches on its values
    processing: Any = None  # the bundle's raw-input processing (``processing.Processing``), checked end to end
    processing_files: tuple[tuple[Path, str], ...] = ()
    bundle: Path | None = None
    report: Path | None = None

    @property
    def budget(self) -> dict[str, float]:
        """The budget in force, defaults included."""
        return self.options.budget.in_force(self.labelled, self.task == "embed")

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    def to_dict(self) -> dict:
        from ..report import ratios
        d = msgspec.to_builtins({k: getattr(self, k) for k in ("model", "variants", "chosen", "chosen_batch_size",
                                                               "machine", "message", "verification", "task", "dims",
                                                               "decision", "noise", "wall_s", "notes",
                                                               "processing", "branches")}, enc_hook=str)
        d.update(bundle=str(self.bundle) if self.bundle else None, report=str(self.report) if self.report else None,
                 spec=msgspec.to_builtins(self.spec), budget=self.budget, ratios=msgspec.to_builtins(ratios(self)),
                 batch_sizes=list(self.options.batch_sizes), target_batch_size=self.options.target,
                 latency_slo_ms=self.options.latency_slo_ms, device=self.options.device)
        return d


Progress = Callable[[str, int, int], None]


def optimize(source, options: OptimizeOptions | None = None, *, inputs: list[str] | None = None,
             weights: str | None = None, dims: dict | None = None, out: str | Path | None = None,
             name: str | None = None, progress: Progress | None = None, eval_data=None, calibration_data=None,
             train_data=None, student=None, tokenizer: str | Path | None = None,
             image_processor: str | Path | None = None, warn: Callable[[str], None] | None = None) -> OptimizeResult:
    """Build every applicable variant of ``source``, verify, profile, select and (with ``out``) bundle it.

    ``eval_data``: held-out inputs (and ``labels`` for a task metric) to verify on, a .npz/.safetensors path or a
    dict; ``calibration_data``: representative inputs for static int8. Data that does not fit the model is one
    line through ``warn`` and the run goes on with the source's own data (or generated inputs).
    ``train_data`` (as ``torchship train`` takes it) adds variants trained from the model: QAT, channel pruning
    with fine-tuning, and distillation into ``student`` (package.module:attr or an nn.Module; the zoo knows its own)."""
    started = time.monotonic()
    opts = options or OptimizeOptions()
    say = progress or (lambda msg, i, n: None)
    warn = warn or (lambda line: warnings.warn(line, stacklevel=2))
    if out is not None:
        from ..outdir import check_writable
        check_writable(Path(out), marker=bundle.MANIFEST)
    say("loading the model", 0, 1)
    model = load(source, inputs=inputs, weights=weights, dims=dims, name=name, eval_data=eval_data,
                 calibration_data=calibration_data, warn=warn)
    if tokenizer is not None:
        model = with_tokenizer(model, Path(tokenizer))
    if image_processor is not None:
        model = with_image_processor(model, Path(image_processor))
    say("looking for control flow on the model's values", 0, 1)
    model = with_branches(model)
    train_data = checked_train_data(train_data, warn)
    variants = plan(model, opts.device, list(opts.runtimes) if opts.runtimes else None, opts.threads, opts.transforms,
                    trainable=train_data is not None, allow_specialization=opts.allow_specialization)
    with Workspace(model, opts) as ws:
        results = build_each(variants, ws, say, train_data, student)
        say("selecting", len(variants), len(variants))
        result = choose(model, results, ws.pool, opts, ws.noise, time.monotonic() - started)
        result = replace(result, notes=notes(model, result.chosen, opts), branches=model.branches)
        if out is not None and result.chosen is not None and opts.processing:
            say("checking the text pipeline end to end", len(variants), len(variants))
            result = with_processing(result, model, ws.root)
        if out is not None and result.chosen is not None:
            say("writing the bundle and report", len(variants), len(variants))
            result = package(result, ws.root, Path(out))
    return result


def load(source, *, inputs=None, weights=None, dims=None, name=None, eval_data=None, calibration_data=None,
         warn: Callable[[str], None]):
    """The model from its source, named, with the user's held-out and calibration data (the held-out data is also
    what the model is first run on, where it fits)."""
    from ..sources import load_source
    from .data import raw_arrays
    model = load_source(source, inputs, weights=weights, dims=dims, example=raw_arrays(eval_data))
    return with_data(replace(model, name=name or model.name), eval_data, calibration_data, warn)


class Workspace:
    """A run's temporary directory: the verification inputs and their reference outputs, the model as a worker
    reloads it, the fork server that starts the workers, and the trained models derived on the way."""

    def __init__(self, model, opts: OptimizeOptions):
        self.model, self.opts = model, opts
        self.root = Path(tempfile.mkdtemp(prefix="torchship-"))
        self.server: ForkServer | None = None
        try:
            self.ref = self._model_ref(model)
            if self.ref is not None and opts.isolate:  # started now: its imports overlap the reference run below
                self.server = ForkServer(self.root / "forkserver.log")
            self.pool: Pool = verification_pool(model)
            self.chunk = min(32, max(opts.batch_sizes))
            np.savez(self.root / "pool.npz", **self.pool.inputs)
            # static int8 calibrates on the source's own representative inputs, else on the verification pool
            np.savez(self.root / "calibration.npz", **(model.calibration_data or self.pool.inputs))
            self.reference = reference_outputs(model, self.pool.inputs, self.chunk)
            self.extra = self._extra_cases(model)
            self.threads = opts.threads or _cores()
            self.derived: dict[tuple, Any] = {}
            self.noise = None
            self._digests: dict[Path, bytes] = {}
            self._linear_share: float | None = None
        except BaseException:  # nothing is left running or on disk
            self.__exit__()
            raise

    def _extra_cases(self, model) -> list[tuple[str, dict, dict]]:
        """The inputs beyond the example with the reference's outputs on them (a case the reference itself cannot run
        is left out), written for the workers."""
        from ..verify import extra_cases
        out = []
        for label, feeds in extra_cases(model, self.pool.inputs if model.eval_data is not None else None,
                                        branch_cases=not self.opts.allow_specialization):
            try:
                out.append((label, feeds, reference_outputs(model, feeds, len(next(iter(feeds.values()))))))  # whole
            except Exception:
                continue
        np.savez(self.root / "extra.npz", **{f"{i}|{k}": v for i, (_, feeds, _) in enumerate(out) for k, v in feeds.items()})
        return out

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
        exported = self.root / "onnxrt" / "model.onnx"  # the plain variant's export: its int8 variants start from it
        own = ref is self.ref and ref.kind != "onnx"  # the workspace's model, not one trained from it
        onnx_base = str(exported) if own and vp.runtime == "onnxrt" and vp.name != "onnxrt" and exported.exists() else None
        return Job(vp, ref, str(self.root / vp.name), str(self.root / "pool.npz"), str(self.root / "calibration.npz"),
                   self.chunk, self.threads, tuple(sys.path), self.cache_for(vp, ref), onnx_base,
                   str(self.root / "extra.npz") if self.extra else None)

    def cache_for(self, vp: VariantPlan, ref: ModelRef) -> str | None:
        """The build cache's directory for this build (``cache.key``), or None without a cache."""
        if not self.opts.cache or ref.kind == "arch" and ref.weights is None:
            return None
        return cache.key(vp, ref, self.threads, (self.pool.inputs, self.model.calibration_data or self.pool.inputs),
                         self._digests)

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
        under forward hooks; 1.0 where that cannot be measured (no module, no Linear leaves to hook)."""
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
                    for _ in range(3):  # the last pass, warm
                        with watch(self.model.module) as w:
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
        shutil.rmtree(self.root, ignore_errors=True)


def _cores() -> int:
    from ..machine import cores
    return cores()


def _skipped(vp: VariantPlan, reason: str, ws: "Workspace") -> VariantResult:
    return VariantResult(name=vp.name, runtime=vp.runtime, status="skipped", reason=reason, note=vp.note,
                         selectable=vp.selectable, options=vp.options, transforms=vp.transforms, lineage=ws.lineage(vp))


def build_each(variants: list[VariantPlan], ws: Workspace, say: Progress, train_data, student) -> list[VariantResult]:
    """Build, verify and probe the planned variants in stages of ones that depend on none of each other (a compressed
    variant on its plain runtime, a pruning level on the gentler one), then time the contenders in interleaved rounds.
    A variant that cannot be made, or need not be, is a row with the reason."""
    search = Search(ws, say, len(variants))
    failed_level: dict[str, int] = {}
    stage: list[tuple[VariantPlan, Any, Any]] = []

    def flush():
        search.build_all(stage)
        for vp, _, _ in stage:
            res = next((e.result for e in search.entries if e.plan.name == vp.name), None)
            if res is not None and res.status == "rejected" and vp.family:
                failed_level.setdefault(vp.family, vp.level)
        stage.clear()

    try:
        for i, vp in enumerate(variants):
            if vp.derived or any(ws.lineage(vp).parent == s.name or vp.sibling == s.name
                                 or (vp.family and s.family == vp.family) for s, _, _ in stage):
                flush()
            gentler_failed = vp.family and failed_level.get(vp.family, vp.level + 1) < vp.level
            reason = vp.skip or (gentler_failed and f"not tried: a gentler {vp.family} variant failed the budget")
            sibling = next((e.result for e in search.entries if vp.sibling and e.plan.name == vp.sibling), None)
            if not reason and sibling is not None and sibling.status == "rejected":
                reason = (f"not tried: {sibling.name}, the same transform on eager, failed the budget ({sibling.reason}); "
                          f"its numerics carry over to {vp.runtime}")
            if not reason and search.over_budget(0.75) and (any(e.result.ok and e.result.selectable for e in search.entries)
                                                            or any(s.selectable for s, _, _ in stage)):
                # spent: the rest are rows that say so, once one candidate is built or on its way (a bundle is made)
                reason = (f"not tried: the time budget of {ws.opts.time_budget_s:g} s was spent on the variants before it "
                          "(raise --time-budget)")
            reason = reason or search.not_worth_building(vp)
            program, training = None, None
            if vp.derived and not reason:
                if vp.derived not in ws.derived:
                    say(f"training {vp.name.partition('+')[2]}{search.left()}", i, len(variants))
                    ws.derived[vp.derived] = _derive(ws, vp.derived, train_data, student)
                derived = ws.derived[vp.derived]
                reason = derived if isinstance(derived, str) else None
                if not reason:
                    program, training = derived
            if reason:
                search.add(_skipped(vp, reason, ws), vp)
            else:
                stage.append((vp, program, training))
        flush()
        search.rounds(lambda: [os.getpid()] + ws.pids() + search.worker_pids())
        ws.noise = search.noise
        order = [v.name for v in variants]
        search.entries.sort(key=lambda e: order.index(e.plan.name))  # the plan's order, whatever finished first
        return search.results()
    finally:
        search.close()


def notes(model, chosen=None, opts: OptimizeOptions | None = None) -> tuple[str, ...]:
    """What the user should know about the model as given, and about a choice that specializes it."""
    from ..flow import describe, specialized
    out = []
    if model.was_training:
        out.append("the model was handed over in training mode (dropout and batch norm behave as in training); "
                   "torchship verifies, times and packages it in eval mode, as it should be served")
    if model.branches:
        allowed = opts is not None and opts.allow_specialization
        out.append(f"the model branches on its values at {describe(model.branches)}: "
                   + ("--allow-specialization: traced and exported variants competed anyway" if allowed else
                      "traced and exported variants (ONNX Runtime, OpenVINO, AOTInductor, TorchScript trace) are not "
                      "candidates, since their graph keeps only the path its example took; eager, torch.compile and "
                      "TorchScript script keep the branch (--allow-specialization if it never fires in production)"))
        if allowed and chosen is not None and specialized(chosen):
            out.append(f"the bundle is SPECIALIZED: {chosen.name} keeps only the path its example took at "
                       f"{describe(model.branches)}; inputs that take another path get another answer than the model's")
    if model.branches_unknown:
        out.append(f"control flow on the model's values could not be looked for ({model.branches_unknown}); a traced "
                   "variant may keep only the path of its example")
    return tuple(out)


def with_branches(model):
    """``model`` with the places its forward branches on its values, found once by dynamo on a small example (a
    .pt2 or ONNX source is a graph already: nothing to look for)."""
    if model.module is None or model.file is not None:
        return model
    import torch

    from ..flow import find_branches
    from ..modules import to_torch
    feeds = {k: v[:2] for k, v in model.eval_data.items()} if model.eval_data else model.spec.sample(2, model.dims)
    try:
        args = to_torch(feeds, model.spec.input_names)
        return replace(model, branches=find_branches(model.module.eval(), args))
    except Exception as exc:  # dynamo cannot capture this model: said, and the search goes on as before
        torch._dynamo.reset()
        return replace(model, branches_unknown=first_line(exc))


def _derive(ws: Workspace, key: tuple, data, student):
    """(program, training summary), or the one line saying why this trained variant cannot be made."""
    from ..errors import TorchshipError
    from ..train.derived import derive
    kind, level = key
    try:
        return derive(ws.model, kind, level, data, ws.root / "derived" / f"{kind}{level or ''}", student=student,
                      epochs=ws.opts.train_epochs)
    except TorchshipError as exc:
        return str(exc)
    except Exception as exc:  # a crash in training or export costs this variant only
        return f"training failed: {first_line(exc)}"


def choose(model, results: list[VariantResult], pool: Pool, opts: OptimizeOptions, noise=None,
           wall_s: float | None = None) -> OptimizeResult:
    from ..machine import info
    decision = select(results, opts.target, opts.latency_slo_ms)
    chosen = next(r for r in results if r.name == decision.chosen) if decision else None
    if chosen is None:
        near = closest(results)
        message = "no variant met the budget" + (f" at p99 <= {opts.latency_slo_ms} ms" if opts.latency_slo_ms else "")
        if near:
            message += f"; closest: {near.name} ({near.reason})"
    else:
        message = f"chose {chosen.name} at batch size {decision.batch}"
        if decision.tied:
            message += f" (tied within the noise with {', '.join(decision.tied)}; the simpler one)"
    machine = info(opts.threads)
    if any(r.runtime == "openvino" and r.status != "skipped" for r in results):
        from ..runtimes.openvino import capabilities
        machine["openvino_capabilities"] = list(capabilities())  # what its CPU plugin runs natively here
    return OptimizeResult(model.name, tuple(results), chosen, decision.batch if decision else None, machine,
                          message, opts, pool.note, model.spec, model.task, dict(model.dims),
                          labelled=pool.labels is not None, decision=decision, noise=noise, wall_s=wall_s)


def package(result: OptimizeResult, root: Path, out: Path) -> OptimizeResult:
    """Write the bundle: the chosen variant's artifact, its manifest and the report."""
    from ..report import write_report
    result = replace(result, bundle=out, report=out / "report" / "report.md")
    report_dir = root / "report"
    write_report(result, report_dir)
    files = [(p, f"report/{p.name}") for p in sorted(report_dir.iterdir())]
    c = result.chosen
    files += [(root / c.name / f, f) for f in c.artifact.files]
    files += list(result.processing_files)
    bundle.write(out, bundle.manifest_for(result), files)
    return result
