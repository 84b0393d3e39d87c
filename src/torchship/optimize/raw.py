"""The bundle's raw input and answers, at optimize time: a tokenizer given apart from the source, and the processing
(text or image pipeline, labels) of the chosen variant, checked end to end before it is packaged."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

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


def with_processing(result, model, root: Path):
    """The result with the bundle's processing, where the model has some: its text pipeline (record and files) or
    image pipeline, checked end to end (raw input through it and the chosen variant against the original library's
    pipeline), and a classifier's labels. A pipeline that fails its check is not packaged, and a note says why."""
    from ..processing import Processing
    from ..processing.build import check_image, check_text, image_processing, labels_of, text_processing
    from ..runtimes import LoadContext, get
    c, notes = result.chosen, result.notes
    seq = c.artifact.options.dim_ranges.get("seq")
    made, files = text_processing(model, root / "processing", int(seq[1]) if seq else None), []
    if made is None:
        made = image_processing(model)
    if isinstance(made, tuple):
        made, files = made
    if isinstance(made, str):
        made, notes = None, notes + (made,)
    labels = labels_of(model)
    if made is None:
        return replace(result, notes=notes, processing=Processing(labels=labels) if labels else None)
    processing, kind = msgspec.structs.replace(made, labels=labels), "text" if made.text else "image"
    plain = not c.transforms and c.artifact.options.precision == "fp32" and not c.artifact.options.quantize
    floor = max(result.budget.get("cosine", 0.999), 0.9999 if plain else 0.0)
    try:
        run = get(c.runtime).load(c.artifact, root / c.name, result.spec,
                                  LoadContext(result.options.device, result.options.threads, True, True))
        check = (check_text if kind == "text" else check_image)(model, processing, root / "processing", run, floor)
    except Exception as exc:
        check, why = None, f"its check failed to run ({first_line(exc)})"
    else:
        why = None if check.passed else (
            f"the bundle's pipeline gave other model inputs than {check.reference}" if not check.inputs_equal
            else f"another best label than {check.reference} on some item" if check.labels_equal is False
            else f"an item reached cosine {check.min_cosine:.6f} < {floor} against {check.reference}")
    if why is not None:
        return replace(result, notes=notes + (f"{kind} processing not packaged: {why}",),
                       processing=Processing(labels=labels) if labels else None)
    return replace(result, notes=notes, processing=msgspec.structs.replace(processing, check=check),
                   processing_files=tuple(files))
