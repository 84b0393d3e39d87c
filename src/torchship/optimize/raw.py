"""The bundle's raw input and answers, at optimize time: a tokenizer given apart from the source, and the processing
(text or image pipeline, labels) of the chosen variant, checked end to end before it is packaged."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import msgspec

from ..errors import UsageError, first_line


def _given(model, folder: Path, flag: str, loader: str, files: tuple[str, ...], tensor: str, field: str):
    """``model`` with a processor saved in ``folder`` (``flag`` on the command line), loaded by transformers'
    ``loader`` class from one of ``files``, for a model that takes ``tensor``."""
    from ..errors import SourceError
    from ..modules import transformers
    what = f"a directory with {files[0]} (save_pretrained(DIR))"
    if not any((folder / f).exists() for f in files):
        raise UsageError(f"{flag} {folder}: none of {', '.join(files)} is there; give {what}")
    try:
        found = getattr(transformers(), loader).from_pretrained(str(folder))
    except Exception as exc:
        raise UsageError(f"{flag} {folder}: cannot load it ({first_line(exc)}); give {what}") from None
    if tensor not in model.spec.input_names:
        raise SourceError(f"{flag}: the model takes {model.spec.input_names}, not {tensor}: raw input cannot feed it")
    return replace(model, **{field: found})


def with_tokenizer(model, folder: Path):
    """``model`` with the tokenizer saved in ``folder`` (optimize --tokenizer), for a source that has none."""
    from ..sources.hf import TOKENIZER_FILES
    return _given(model, folder, "--tokenizer", "AutoTokenizer", TOKENIZER_FILES, "input_ids", "tokenizer")


def with_image_processor(model, folder: Path):
    """``model`` with the image processor saved in ``folder`` (optimize --image-processor), for a source that has
    none."""
    return _given(model, folder, "--image-processor", "AutoImageProcessor", ("preprocessor_config.json",),
                  "pixel_values", "image_processor")


def with_processing(result, model, root: Path, rechoose: Callable | None = None, known=None):
    """The result with the bundle's processing, where the model has some: its text pipeline (record and files) or
    image pipeline, checked end to end (raw input through it and the chosen variant against the original library's
    pipeline), and a classifier's labels. A chosen variant whose answers on that input fall short while the pipeline
    itself is right is rejected with the reason, and ``rechoose`` (the variants -> a result) chooses again; that
    choice is checked in turn. A pipeline that fails its check is not packaged, and a note says why. ``known``: the
    search's cases (``cases``), taken again where the chosen variant's pipeline is the one they went through (the
    original library's answers on them cost 4-5 s on MiniLM: sentence-transformers loaded and run, and the source)."""
    from ..processing import Processing
    from ..processing.build import labels_of
    labels = labels_of(model)
    made = _made(model, result.chosen, root)
    if not isinstance(made, tuple):
        return replace(result, notes=result.notes + ((made,) if made else ()),
                       processing=Processing(labels=labels) if labels else None)
    kind = "text" if made[0].text else "image"
    result, check, why, rejected = settle(
        result, lambda c, r: _check(c, r, model, _made(model, c, root)[0], kind, root, known), rechoose)
    notes = result.notes + tuple(f"{name}: rejected, its answers on raw {kind} fell short ({reason})"
                                 for name, reason in rejected)
    if why is not None:
        return replace(result, notes=notes + (f"{kind} processing not packaged: {why}",),
                       processing=Processing(labels=labels) if labels else None)
    processing, files = _made(model, result.chosen, root)
    return replace(result, notes=notes, processing=msgspec.structs.replace(processing, check=check),
                   processing_files=tuple(files))


def _made(model, variant, root: Path):
    """(processing record with the labels, its files) for ``variant`` (text is cut at the longest sequence it takes;
    None: the model's own length), or why there is none (a line), or None for a model that takes neither text nor
    images."""
    from ..processing.build import image_processing, labels_of, text_processing
    seq = variant.artifact.options.dim_ranges.get("seq") if variant is not None else None
    made, files = text_processing(model, root / "processing", int(seq[1]) if seq else None), []
    if made is None:
        made = image_processing(model)
    if isinstance(made, tuple):
        made, files = made
    if made is None or isinstance(made, str):
        return made
    return msgspec.structs.replace(made, labels=labels_of(model)), files


def cases(model, root: Path):
    """The raw-input cases every variant is verified on in the search (``processing.build.RawCases``: the model's
    pipeline, its inputs and the original library's answers), where the pipeline is right; else None (the check of
    the chosen variant, after the search, says why)."""
    from ..processing.build import image_cases, text_cases
    made = _made(model, None, root)
    if not isinstance(made, tuple):
        return None
    processing = made[0]
    try:
        found = (text_cases if processing.text else image_cases)(model, processing, root / "processing")
    except Exception:  # the check after the search runs it again and says why
        return None
    return replace(found, processing=processing) if found.right else None


def floor(budget: dict[str, float], variant) -> float:
    """The cosine every checked item must keep: 0.9999 for a plain fp32 variant, else the budget's cosine floor in
    force. Where the budget measures a task metric instead (accuracy, retrieval), raw input is judged as the inputs
    beyond the verification items are (``verify.beyond_the_example``): a relative error of at most 3x the variant's
    own on the verification items, or 2%, as the cosine that allows (1 - e^2/2); none where that error is unknown."""
    from ..processing.records import PIPELINE_FLOOR
    from ..similarity import extra_cosine
    if not variant.compressed:
        return PIPELINE_FLOOR
    if "cosine" in budget:
        return budget["cosine"]
    own = variant.fidelity.relative_error if variant.fidelity else None
    if own is None:
        return 0.0
    return round(extra_cosine(own), 6)


def _check(c, result, model, processing, kind: str, root: Path, known=None):
    """(check, why it failed or None) for variant ``c``: raw input through the pipeline and ``c`` (on ``known``, the
    search's cases, where they went through the same pipeline)."""
    from ..processing.build import check_image, check_text
    from ..runtimes import LoadContext, get
    try:
        run = get(c.runtime).load(c.artifact, root / c.name, result.spec,
                                  LoadContext(result.options.device, result.options.threads, True, True))
        if known is not None and known.processing == processing:
            check = known.check(run(known.feeds), floor(result.budget, c))
        else:
            check = (check_text if kind == "text" else check_image)(model, processing, root / "processing", run,
                                                                     floor(result.budget, c))
    except Exception as exc:
        return None, f"its check failed to run ({first_line(exc)})"
    return check, shortfall(check)


def shortfall(check) -> str | None:
    """Why a raw-input check failed, in words; None where it passed."""
    if check.passed:
        return None
    return (f"the bundle's pipeline gave other model inputs than {check.reference}" if not check.inputs_equal
            else f"the source model in eager fp32 through it reached cosine {check.source_min_cosine:.6f} "
                 f"against {check.reference}" if not check.variant_fault
            else f"another best label than {check.reference} on some item" if check.labels_equal is False
            else f"an item reached cosine {check.min_cosine:.6f} < {check.floor} against {check.reference}")


def settle(result, check: Callable, rechoose: Callable | None):
    """(result, the passing check, why none passed or None, the variants rejected on the way with the reason): the
    chosen variant checked (``check(variant, result)`` -> (check, why)); where it falls short but the pipeline is
    right, it is rejected and ``rechoose`` chooses among the rest, until one passes or none is left."""
    first, rejected = result, []
    while True:
        c = result.chosen
        found, why = check(c, result)
        if why is None or found is None or not found.variant_fault or rechoose is None:
            return result, found, why, rejected
        rejected.append((c.name, why))
        result = rechoose([msgspec.structs.replace(r, status="rejected", reason=f"raw input: {why}")
                           if r.name == c.name else r for r in result.variants])
        if result.chosen is None:  # none holds on raw input: the first choice, serving tensors only
            return first, None, f"no variant within budget kept its answers on it ({', '.join(n for n, _ in rejected)}: " \
                f"{why})", []
