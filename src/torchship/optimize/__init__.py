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
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import msgspec

from .. import bundle
from ..errors import first_line
from ..plan import VariantPlan, plan
from ..results import VariantResult
from ..measure import Noise
from ..mix import Mix
from ..select import Decision, closest, select
from .data import Pool, checked_train_data, with_data
from .options import OptimizeOptions
from .raw import with_image_processor, with_processing, with_tokenizer
from .search import Search
from .workers import ForkServer
from .workspace import Workspace

__all__ = ["OptimizeOptions", "OptimizeResult", "optimize"]


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
    mix: Mix | None = None  # the lengths every contender was timed at, where not only the example's
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
                                                               "processing", "branches", "mix")}, enc_hook=str)
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
    # the workers' fork server starts first: its imports (torch, dynamo: about 3 s) overlap loading the model and
    # looking for its control flow; the workspace takes it over
    server = ForkServer() if opts.isolate else None
    try:
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
        variants = plan(model, opts.device, list(opts.runtimes) if opts.runtimes else None, opts.threads,
                        opts.transforms, trainable=train_data is not None,
                        allow_specialization=opts.allow_specialization, floors=floors(opts, model))
    except BaseException:
        if server is not None:
            server.close()
        raise
    with Workspace(model, opts, server) as ws:
        results = build_each(variants, ws, say, train_data, student)
        say("selecting", len(variants), len(variants))

        def decide(results: list[VariantResult]) -> OptimizeResult:
            r = choose(model, results, ws.pool, opts, ws.noise, time.monotonic() - started)
            return replace(r, notes=notes(model, r.chosen, opts), branches=model.branches, mix=ws.mix)
        result = decide(results)
        if out is not None and result.chosen is not None and opts.processing:
            say("checking raw input end to end", len(variants), len(variants))
            result = with_processing(result, model, ws.root, decide, ws.raw)
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


def build_each(variants: list[VariantPlan], ws: Workspace, say: Progress, train_data, student) -> list[VariantResult]:
    """Build, verify and probe the planned variants in stages of ones that depend on none of each other (a compressed
    variant on its plain runtime, on the same transform on eager, a pruning level on the gentler one), then time the
    contenders in interleaved rounds. A stage takes every variant, in the plan's order, that depends on none in it nor
    on one left for later: fewer stages, so fewer waits for a stage's last build with a core idle (on MiniLM the int8
    variants of eager went in a stage of three of their own). A variant trained from the model is trained while
    nothing builds, first in its stage. A variant that cannot be made, or need not be, is a row with the reason."""
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

    def waits(vp: VariantPlan, on: list[VariantPlan]) -> bool:
        """Whether ``vp`` needs the result of one of ``on`` first."""
        return any(ws.lineage(vp).parent == s.name or vp.sibling == s.name or (vp.family and s.family == vp.family)
                   for s in on)

    def consider(i: int, vp: VariantPlan) -> None:
        gentler_failed = vp.family and failed_level.get(vp.family, vp.level + 1) < vp.level
        reason = vp.skip or (gentler_failed and f"not tried: a gentler {vp.family} variant failed the budget")
        sibling = next((e.result for e in search.entries if vp.sibling and e.plan.name == vp.sibling), None)
        if not reason and sibling is not None and sibling.status == "rejected":
            reason = (f"not tried: {sibling.name}, the same transform on eager, failed the budget ({sibling.reason}); "
                      f"its numerics carry over to {vp.runtime}")
        reason = reason or search.spent(any(s.selectable for s, _, _ in stage)) or search.not_worth_building(vp)
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
            search.skip(vp, reason)
        else:
            stage.append((vp, program, training))

    try:
        left = list(enumerate(variants))
        while left:
            later: list[tuple[int, VariantPlan]] = []
            for i, vp in left:
                if (vp.derived and stage) or waits(vp, [s for s, _, _ in stage] + [v for _, v in later]):
                    later.append((i, vp))
                else:
                    consider(i, vp)
            flush()
            left = later
        search.rounds(lambda: [os.getpid()] + ws.pids() + search.worker_pids())
        ws.noise = search.noise
        order = [v.name for v in variants]
        search.entries.sort(key=lambda e: order.index(e.plan.name))  # the plan's order, whatever finished first
        return search.results()
    finally:
        search.close()


def floors(opts: OptimizeOptions, model) -> dict[str, float]:
    """The budget's cosine and retrieval floors in force for this model (what int8 with accuracy control keeps)."""
    in_force = opts.budget.in_force(model.labels is not None, model.task == "embed")
    return {k: in_force[k] for k in ("cosine", "retrieval") if k in in_force}


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
