"""Fidelity: every variant against the eager fp32 reference on the same inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import msgspec
import numpy as np

from .errors import UsageError
from .similarity import EXTRA_FACTOR, EXTRA_TOLERANCE, cosines, retrieval  # noqa: F401 (retrieval: part of this
# module's face)


@dataclass(frozen=True)
class Budget:
    """What a variant must keep. ``max_accuracy_drop`` applies when labels are given (absolute, 0.01 = 1 point) and
    then is the measure: the cosine and top-1 floors hold only where set. ``min_retrieval`` is the same for an
    embedding model: what embeddings are used for, the share of each item's nearest neighbours (cosine, among the
    verification items) that stay its neighbours, against fp32. Without either they default to 0.999 and 0.99 of
    agreement with the fp32 original."""

    min_cosine: float | None = None
    min_top1: float | None = None
    max_accuracy_drop: float | None = None
    min_retrieval: float | None = None

    def floors(self, by_task: bool) -> tuple[float | None, float | None]:
        """(cosine, top-1) floors in force: the defaults unless a task metric is the measure."""
        if by_task:
            return self.min_cosine, self.min_top1
        return (0.999 if self.min_cosine is None else self.min_cosine), (0.99 if self.min_top1 is None else self.min_top1)

    _KEYS = {"cosine": "min_cosine", "top1": "min_top1", "accuracy_drop": "max_accuracy_drop",
             "retrieval": "min_retrieval"}

    @classmethod
    def parse(cls, text: str | None) -> "Budget":
        """``cosine=0.999,top1=0.99,accuracy_drop=0.01`` (any subset)."""
        if not text:
            return cls()
        values = {}
        for part in text.split(","):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in cls._KEYS:
                raise UsageError(f"--budget {text!r}: write KEY=VALUE[,...] with KEY one of {', '.join(cls._KEYS)}")
            try:
                number = float(val)
            except ValueError:
                raise UsageError(f"--budget: {key}={val!r} is not a number") from None
            if not 0 <= number <= 1:
                raise UsageError(f"--budget: {key}={number} must lie between 0 and 1")
            values[cls._KEYS[key]] = number
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def in_force(self, by_accuracy: bool = False, embed: bool = False) -> dict[str, float]:
        """The floors and limits that apply, defaults included (what a report prints); ``embed``: an embedding model,
        where a retrieval floor is the measure."""
        by_retrieval = embed and self.min_retrieval is not None
        cosine, top1 = self.floors(by_accuracy and self.max_accuracy_drop is not None or by_retrieval)
        values = {"cosine": cosine, "top1": top1, "accuracy_drop": self.max_accuracy_drop,
                  "retrieval": self.min_retrieval if by_retrieval else None}
        return {k: v for k, v in values.items() if v is not None}


class Fidelity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_abs_error: float
    cosine: float  # mean over items of the per-item cosine similarity (first output)
    cosine_min: float
    top1: float | None  # agreement of argmax with the reference (classifiers), near-ties not counted as flips
    accuracy: float | None  # task metric when labels are given
    reference_accuracy: float | None
    passed: bool
    reason: str
    relative_error: float | None = None  # ||out - ref|| / ||ref|| on the verification inputs (the worst output)
    checked: tuple[str, ...] = ()  # the other inputs it was also checked on (batch 1, seq=4, values x2, ...)
    extra_error: float | None = None  # the worst relative error on those
    near_ties: int = 0  # items whose top-2 logits lie within the variant's numeric error (flips there do not count)
    retrieval: float | None = None  # embeddings: the share of each item's nearest neighbours kept (see ``retrieval``)
    similarity_rank: float | None = None  # embeddings: rank correlation of the pairwise similarities with fp32's
    # raw input through the bundle's pipeline against the original library's (``optimize.raw``): the worst item's
    # cosine, and the floor it had to keep
    raw_cosine: float | None = None
    raw_floor: float | None = None


def relative_limit(min_cosine: float) -> float:
    """The relative error a cosine floor allows, twice over: noise orthogonal to the reference at cosine c is
    sqrt(2 (1 - c)) of its norm (0.045 at 0.999). Cosine is blind to scale; this is not."""
    return 2 * float(np.sqrt(2 * max(1e-12, 1 - min_cosine)))


def relative_error(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> float:
    """The worst output's ||out - ref|| / ||ref|| (L2, float64); infinite where an output is missing or misshapen."""
    worst = 0.0
    for name, ref in reference.items():
        out = outputs.get(name)
        if out is None or out.shape != ref.shape:
            return float("inf")
        r, o = ref.astype(np.float64), out.astype(np.float64)
        if not np.isfinite(o).all():
            return float("inf")
        worst = max(worst, float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12)))
    return worst


def extra_cases(model, pool: Mapping[str, np.ndarray] | None, seed: int = 7,
                branch_cases: bool = True,
                items: Mapping[str, np.ndarray] | None = None) -> list[tuple[str, dict[str, np.ndarray], np.ndarray | None]]:
    """Inputs beyond the example, where a graph that specialized on it (a loop unrolled, a branch taken, a shape
    fixed) gives another answer than the model: batch 1 and an odd batch, each dynamic dimension smaller and larger
    (with padding in an attention mask; from the held-out items where there are some, see ``stretched``: generated
    token ids are random words in no order, without the [CLS] first, which a calibrated int8 never saw), and inputs
    scaled by 0.5, 2 and -1; for a model that branches on its values, ``branch_cases`` adds them scaled by 10,000 and
    shifted by -10 and +10, and so for a model whose control flow could not be looked for (not when the user
    consented to specializing: they said the branch never fires). ``items``: the verification items, where the batch
    cases take theirs (the third of a case: their indices there, else None), so that a variant is judged there
    against its own error on the same items: one item's relative error says little next to a whole pool's."""
    spec, dims = model.spec, dict(model.dims)

    def picked(batch: int, source: Mapping[str, np.ndarray]) -> np.ndarray:
        return (np.arange(batch) * 7 + 1) % len(next(iter(source.values())))

    def base(batch: int, source=pool) -> dict[str, np.ndarray]:
        if source:
            return {k: np.ascontiguousarray(v[picked(batch, source)]) for k, v in source.items()}
        return spec.sample(batch, dims, seed=seed + batch)
    cases = []
    if spec.has_batch:
        cases += [(f"batch {n}", base(n, items or pool), picked(n, items) if items else None) for n in (1, 5)]
    real = pool and not any(t.tied for t in spec.inputs)  # values that depend on a size are generated to fit it
    for s in spec.symbols:
        n = dims.get(s, 16)
        for v in sorted({max(2, n // 4), n + max(3, n // 2)} - {n}):
            feeds = stretched(base(3), spec, s, v) if real else spec.sample(3, {**dims, s: v}, seed=seed + v)
            for t in spec.inputs:  # a padded item: the mask's tail off, as a tokenizer pads
                if t.name.endswith("mask") and s in t.shape and feeds[t.name].ndim == 2:
                    feeds[t.name][0, max(1, v // 2):] = 0
            cases.append((f"{s}={v}", feeds, None))
    floats = [t.name for t in spec.inputs if t.dtype.startswith("float")]
    if floats:
        for label, factor in (("values x0.5", 0.5), ("values x2", 2.0), ("values negated", -1.0)):
            feeds = base(4)
            cases.append((label, {k: (v * factor).astype(v.dtype) if k in floats else v for k, v in feeds.items()}, None))
    branchy = getattr(model, "branches", ()) or getattr(model, "branches_unknown", None)  # found, or not looked for
    if floats and branch_cases and branchy:  # it branches on its values (or may): push them far both ways, so
        # that a variant which kept the branch (TorchScript script, compile) is checked on the other side where
        # these reach it
        for label, scale, shift in (("values x10000", 1e4, 0.0), ("values shifted -10", 1.0, -10.0),
                                    ("values shifted +10", 1.0, 10.0)):
            feeds = base(4)
            cases.append((label, {k: (v * scale + shift).astype(v.dtype) if k in floats else v for k, v in feeds.items()},
                          None))
    return cases


def stretched(feeds: Mapping[str, np.ndarray], spec, dim: str, size: int) -> dict[str, np.ndarray]:
    """The same items with dimension ``dim`` cut to ``size``, or continued by the next item's values (and the next),
    as real data of that length looks."""
    out = {}
    for t in spec.inputs:
        a = feeds[t.name]
        if dim not in t.shape:
            out[t.name] = a
            continue
        axis = t.shape.index(dim)
        repeats = -(-size // a.shape[axis])
        a = np.concatenate([np.roll(a, -j, axis=0) for j in range(repeats)], axis=axis)
        out[t.name] = np.ascontiguousarray(np.take(a, np.arange(size), axis=axis))
    return out


def beyond_the_example(main_error: float, cases: list[tuple[str, Mapping, Mapping]], outputs: list, errors: Mapping[int, str],
                       values_unjudged: str | None = None, own: Mapping[int, float] | None = None):
    """(checked labels, worst relative error, the reason it diverged or None). ``cases``: (label, feeds, reference
    outputs); ``outputs``: the variant's outputs per case (None where it raised, with ``errors[i]``).
    ``values_unjudged``: why the scaled-value cases are reported, not judged (batch and shape cases always are),
    for a variant whose answers past its data's range say nothing of its graph: a calibrated quantization holds
    its activation ranges from the calibration data and saturates beyond them by design, and a model trained again
    from the data (channels pruned, a distilled student) was fitted within its range only.
    ``own``: per case, the variant's error on the same items in the verification run, where the case's items are
    verification items (the batch cases): the case is judged against that, not against the whole pool's."""
    own = own or {}
    worst, reason = 0.0, None
    labels = []
    for i, ((label, _, ref), out) in enumerate(zip(cases, outputs)):
        judged = not (values_unjudged and label.startswith("values"))
        labels.append(label if judged else f"{label} (reported, not judged: {values_unjudged})")
        if out is None:
            if judged:
                reason = reason or f"fails on inputs the example did not cover ({label}): {errors.get(i, 'no outputs')}"
            continue
        e, base = relative_error(ref, out), own.get(i, main_error)
        worst = max(worst, e) if judged else worst
        if judged and e > max(EXTRA_TOLERANCE, EXTRA_FACTOR * base) and reason is None:
            where = "the same items in the verification run" if i in own else "the verification inputs"
            reason = (f"diverges from eager on inputs the example did not cover ({label}): relative error {e:.3g}, "
                      f"against {base:.3g} on {where} (a graph specialized on its example: "
                      "a loop unrolled, a branch or a shape fixed)")
    return tuple(labels), worst, reason


def compare(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], budget: Budget,
            task: str = "other", labels: np.ndarray | None = None) -> Fidelity:
    """Compare every output; the cosine and top-1 are taken on the first output."""
    names = list(reference)
    missing = [n for n in names if n not in outputs]
    if missing:
        return Fidelity(float("inf"), 0.0, 0.0, None, None, None, False, f"outputs missing: {missing}")
    for n in names:
        if reference[n].shape != outputs[n].shape:
            return Fidelity(float("inf"), 0.0, 0.0, None, None, None, False,
                            f"output {n!r} has shape {list(outputs[n].shape)}, reference {list(reference[n].shape)}")
    finite = all(np.isfinite(outputs[n]).all() for n in names if outputs[n].dtype.kind == "f")
    max_abs = max(float(np.abs(reference[n].astype(np.float64) - outputs[n].astype(np.float64)).max(initial=0)) for n in names)
    ref, out = reference[names[0]], outputs[names[0]]
    cos = cosines(ref, out)
    top1 = acc = ref_acc = None
    near = 0
    if task == "classify":
        flips = ref.argmax(-1) != out.argmax(-1)
        top2 = np.sort(ref.reshape(len(ref), -1).astype(np.float64), axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        error = np.abs(ref.reshape(len(ref), -1).astype(np.float64) - out.reshape(len(out), -1).astype(np.float64)).max(-1)
        # the variant's typical numeric error (not the item's own, which a swap makes large): where the reference's
        # top two lie closer than twice that, either answer is fair
        tied = margin <= 2 * float(np.median(error))
        near = int((flips & tied).sum())
        top1 = float(1 - (flips & ~tied).mean())
        if labels is not None:
            acc, ref_acc = float((out.argmax(-1) == labels).mean()), float((ref.argmax(-1) == labels).mean())
    kept = retrieval(ref, out) if task == "embed" else None
    problems = []
    by_task = (acc is not None and budget.max_accuracy_drop is not None
               or kept is not None and budget.min_retrieval is not None)
    min_cos, min_top1 = budget.floors(by_task)
    if not finite:
        problems.append("non-finite outputs")
    rel = relative_error(reference, outputs)
    if min_cos is not None and cos.mean() < min_cos:
        problems.append(f"cosine {cos.mean():.6f} < {min_cos}")
    elif min_cos is not None and rel > relative_limit(min_cos):
        problems.append(f"relative error {rel:.3g} > {relative_limit(min_cos):.3g}: the outputs are off in scale, which "
                        "cosine does not see")
    if top1 is not None and min_top1 is not None and top1 < min_top1:
        problems.append(f"top-1 agreement {top1:.2%} < {min_top1:.0%}")
    if acc is not None and budget.max_accuracy_drop is not None and ref_acc - acc > budget.max_accuracy_drop:
        problems.append(f"accuracy drop {ref_acc - acc:.2%} > {budget.max_accuracy_drop:.2%}")
    if kept is not None and budget.min_retrieval is not None and kept[0] < budget.min_retrieval:
        problems.append(f"retrieval {kept[0]:.3f} < {budget.min_retrieval} (nearest neighbours kept)")
    return Fidelity(max_abs, float(cos.mean()), float(cos.min()), top1, acc, ref_acc, not problems,
                    "; ".join(problems) or "within budget", rel, near_ties=near,
                    retrieval=kept[0] if kept else None, similarity_rank=kept[1] if kept else None)


def reference_outputs(model, pool: Mapping[str, np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """What every variant is compared with: eager fp32 (for an ONNX source, ONNX Runtime with every optimization off)."""
    if model.module is None:
        from .runtimes.onnxrt import OrtRunner, session
        runner = OrtRunner(session(model.onnx_path, optimize=False), model.spec)
    else:
        from .runtimes._torch import TorchRunner
        runner = TorchRunner(model.module.eval(), model.spec)
    from .spec import batches, concat_batches
    outputs = []
    for b in batches(pool, chunk):
        try:
            outputs.append(runner(b))
        except Exception as exc:  # as the first run of the model: one line with what it was given and the likely fix
            from .errors import ModelError, first_line
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in b.items())
            raise ModelError(f"the model fails on the verification inputs ({shapes}): {first_line(exc)}; if they are "
                             "your --eval-data, check they fit the model; if an input's values depend on a dimension "
                             "(lengths), give its range as e.g. lengths:int64[batch]{1:seq+1}") from exc
    return concat_batches(outputs)
