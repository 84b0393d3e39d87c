"""A bundle's processing at optimize time: the record and its files from the source, and the end-to-end check of raw
input through the bundle's pipeline against the original library's pipeline (torch and transformers are here)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import ImageProcessing, Labels, Processing, ProcessingCheck, TextProcessing, pipeline
from .records import PIPELINE_FLOOR

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

# text nobody tunes for: what a served embedding model gets (besides the source's own held-out sentences)
HARD_TEXT = {
    "empty": "",
    "whitespace": " \t\n  ",
    "accents": "Straße, naïve café in München: Ærøskøbing and São Paulo",
    "cjk": "日本語の文章を埋め込みに変換します。中文句子也一样。",
    "cyrillic and arabic": "Привет, как дела? مرحبا بالعالم",
    "emoji": "great release 🚀🔥👍🏽 — works 👨‍👩‍👧 fine",
    "one word": "ok",
    "markup": "<b>bold</b> & \"quoted\" 'text' {json: [1, 2]} C:\\path\\file.txt",
}
LONG_TEXT = ("The quarterly report was delayed because every figure in it had to be checked twice by hand. " * 40).strip()


def text_processing(model, workdir: Path, max_length: int | None = None) -> tuple[Processing, list[tuple[Path, str]]] | str | None:
    """The text record of ``model`` (its tokenizer's ``tokenizer.json`` written into ``workdir``), or why there is
    none (a line), or None for a model that takes no text."""
    names = model.spec.input_names
    tok = model.tokenizer
    if tok is None or "input_ids" not in names:
        return None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return (f"text processing not packaged: the tokenizer ({type(tok).__name__}) has no tokenizer.json (a slow "
                "tokenizer); save a fast one beside the model")
    from tokenizers import Tokenizer
    length = min(filter(None, (model.text_length, max_length)), default=None) or model.dims.get("seq") or 512
    own = Tokenizer.from_str(backend.to_str())
    own.no_padding()
    own.no_truncation()
    workdir.mkdir(parents=True, exist_ok=True)
    own.save(str(workdir / "tokenizer.json"))
    ids = model.spec.by_name["input_ids"]
    record = TextProcessing(
        max_length=int(length), mask="attention_mask" if "attention_mask" in names else None,
        type_ids="token_type_ids" if "token_type_ids" in names else None,
        pad_id=int(tok.pad_token_id) if getattr(tok, "pad_token_id", None) is not None else 0,
        vocab_size=ids.range[1] if ids.range else (len(tok) or None),
        output="embedding" if model.task == "embed" and "embedding" in model.spec.output_names else None)
    return Processing(text=record), [(workdir / "tokenizer.json", "tokenizer.json")]


def check_texts(model) -> tuple[list[str], tuple[str, ...]]:
    """What the text pipeline is checked on: the source's own held-out sentences (``model.texts``: zoo:minilm has
    some) and the hard cases, in one batch of mixed lengths."""
    own = list(model.texts or ())[:16]
    texts = own + list(HARD_TEXT.values()) + [LONG_TEXT]
    cases = (("held-out sentences",) if own else ()) + tuple(HARD_TEXT) + ("longer than the model takes",
                                                                            "mixed lengths in one batch")
    return texts, cases


def _eager(model, record: TextProcessing, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The source model in eager fp32 on ``feeds``: the output that answers a text."""
    import torch
    with torch.inference_mode():
        outs = model.module(*[torch.from_numpy(np.asarray(feeds[n], dtype=np.int64)) for n in model.spec.input_names])
    out = outs[model.spec.output_names.index(record.output)] if record.output else outs[0]
    return out.float().numpy()


def _reference(model, record: TextProcessing, texts: list[str]) -> tuple[np.ndarray, list[list[int]], str]:
    """The original library's own pipeline on ``texts``: sentence-transformers' ``encode`` for its directories, else
    the transformers tokenizer and the eager fp32 model."""
    tok = model.tokenizer
    enc = tok(texts, padding=True, truncation=True, max_length=record.max_length, return_tensors="np")
    lengths = enc["attention_mask"].sum(1)
    ids = [list(map(int, row[:n])) for row, n in zip(enc["input_ids"], lengths)]
    if model.text_reference is not None:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(model.text_reference), device="cpu")
        st.max_seq_length = record.max_length
        out = st.encode(texts, batch_size=len(texts), convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32), ids, "sentence-transformers encode() on the source directory"
    return _eager(model, record, {n: enc[n] for n in model.spec.input_names}), ids, \
        "the transformers tokenizer and the model in eager fp32"


def _cosines(got, want, mine: list[list[int]], ids: list[list[int]]) -> tuple[list[float], float]:
    """Per item: the cosine of ``got`` to ``want`` (-1 where their shapes differ) and the largest difference; per-token
    outputs are compared on the real tokens only."""
    if np.ndim(got) == 3 and np.ndim(want) == 3:
        got, want = [g[:len(r)] for g, r in zip(got, mine)], [w[:len(r)] for w, r in zip(want, ids)]
    cos, worst = [], 0.0
    for g, w in zip(got, want):
        g, w = np.ravel(g).astype(np.float64), np.ravel(w).astype(np.float64)
        if g.shape != w.shape:
            cos.append(-1.0)
            continue
        cos.append(float(g @ w / max(np.linalg.norm(g) * np.linalg.norm(w), 1e-30)))
        worst = max(worst, float(np.abs(g - w).max()))
    return cos, worst


@dataclass(frozen=True)
class RawCases:
    """Raw input through the bundle's pipeline, as the model's input tensors, with the original library's answers on
    it: what the chosen variant is checked on before it is packaged, and what every variant is verified on in the
    search where the pipeline is right (``right``: a shortfall is then the variant's)."""

    kind: str  # text or image
    feeds: dict[str, np.ndarray]  # the pipeline's model inputs, all items in one batch
    output: str  # the output that answers (compared item by item)
    want: np.ndarray  # the original library's answers
    reference: str  # that library's pipeline, in words
    cases: tuple[str, ...]
    inputs_equal: bool  # the same token ids, or pixels within 1e-3, as that library's
    max_input_error: float = 0.0
    source_min_cosine: float | None = None  # the source in eager fp32 through the pipeline, against ``want``
    mine: list[list[int]] | None = None  # text: each item's real tokens, from the pipeline and from the reference
    ids: list[list[int]] | None = None
    labels: bool = False  # a classifier: its best label is compared too
    processing: Processing | None = None  # the pipeline they went through, where the caller keeps it for reuse

    @property
    def right(self) -> bool:
        return self.inputs_equal and (self.source_min_cosine is None or self.source_min_cosine >= PIPELINE_FLOOR)

    def cosines(self, outputs: Mapping[str, np.ndarray]) -> tuple[list[float], float]:
        """Each item's cosine to the reference's answer, and the largest difference."""
        got = np.asarray(outputs[self.output], dtype=np.float64)
        if self.kind == "text":
            return _cosines(got, self.want, self.mine, self.ids)
        return _cosines(got.reshape(len(got), -1), self.want.reshape(len(self.want), -1), [], [])

    def check(self, outputs: Mapping[str, np.ndarray], floor: float) -> ProcessingCheck:
        """A variant's ``outputs`` on ``feeds`` held to the reference: every item at cosine ``floor`` or more (and, for
        a classifier where a cosine floor is in force, the same best label), the pipeline right."""
        cos, worst = self.cosines(outputs)
        same_labels = None
        if self.labels:
            got = np.asarray(outputs[self.output]).reshape(len(self.want), -1)
            same_labels = bool((got.argmax(1) == self.want.reshape(len(self.want), -1).argmax(1)).all())
        return ProcessingCheck(reference=self.reference, items=len(cos), cases=self.cases, min_cosine=round(min(cos), 7),
                               max_abs_error=worst, inputs_equal=self.inputs_equal, max_input_error=self.max_input_error,
                               labels_equal=same_labels, kind=self.kind, floor=floor,
                               source_min_cosine=None if self.source_min_cosine is None else round(self.source_min_cosine, 7),
                               passed=self.right and min(cos) >= floor and (same_labels is not False or not floor))


def text_cases(model, processing: Processing, folder: Path) -> RawCases:
    """Raw text through the bundle's pipeline (its tokenizer.json) and through the original library's pipeline, item
    by item. Where that library is sentence-transformers, the source model in eager fp32 runs the pipeline's tokens
    too (``source_min_cosine``): so a shortfall is known to be the pipeline's or the variant's."""
    record = processing.text
    texts, cases = check_texts(model)
    feeds = pipeline(processing, folder).encode(texts)
    want, ids, reference = _reference(model, record, texts)
    mask = feeds.get(record.mask) if record.mask else None
    mine = [list(map(int, row[:int(m.sum())])) if mask is not None else list(map(int, row))
            for row, m in zip(feeds[record.ids], mask if mask is not None else feeds[record.ids])]
    source = min(_cosines(_eager(model, record, feeds), want, mine, ids)[0]) if model.text_reference is not None else None
    return RawCases("text", feeds, record.output or model.spec.output_names[0], want, reference, cases, mine == ids,
                    source_min_cosine=source, mine=mine, ids=ids)


def check_text(model, processing: Processing, folder: Path, run: Runner, floor: float) -> ProcessingCheck:
    """Raw text through the bundle's pipeline and ``run`` (a variant) against the original library's pipeline, item by
    item (``text_cases``): the same tokens, and cosine >= ``floor`` for every item."""
    cases = text_cases(model, processing, folder)
    return cases.check(run(cases.feeds), floor)


def labels_of(model) -> Labels | None:
    """A classifier's class names (``id2label``), for the output its logits are."""
    names = model.class_names
    if model.task != "classify" or not names or not model.spec.output_names:
        return None
    return Labels(output=model.spec.output_names[0], names=tuple(names))


def image_processing(model) -> Processing | str | None:
    """The image record of ``model`` from its image processor's declared steps, or why there is none (a line), or
    None for a model that takes no images."""
    proc = model.image_processor
    if proc is None or "pixel_values" not in model.spec.input_names:
        return None
    d = proc.to_dict()
    kind = d.get("image_processor_type", type(proc).__name__)
    size = dict(d.get("size") or {})
    crop = dict(d.get("crop_size") or {}) if d.get("do_center_crop") else {}
    if d.get("do_pad") or size.get("longest_edge") or size.get("max_height") or (crop and not {"height", "width"} <= set(crop)):
        return f"image processing not packaged: {kind}'s steps ({sorted(k for k in d if d[k])}) are not ones torchship runs"
    mean, std = d.get("image_mean"), d.get("image_std")
    record = ImageProcessing(
        size=(int(size["height"]), int(size["width"])) if d.get("do_resize", True) and "height" in size else None,
        shortest_edge=int(size["shortest_edge"]) if d.get("do_resize", True) and "shortest_edge" in size else None,
        crop_pct=float(d["crop_pct"]) if d.get("crop_pct") is not None and "shortest_edge" in size else None,
        crop=(int(crop["height"]), int(crop["width"])) if crop else None,
        resample=int(d.get("resample", 2)),
        rescale=float(d["rescale_factor"]) if d.get("do_rescale", True) and d.get("rescale_factor") else None,
        mean=tuple(map(float, mean if isinstance(mean, (list, tuple)) else [mean] * 3)) if d.get("do_normalize") and mean is not None else None,
        std=tuple(map(float, std if isinstance(std, (list, tuple)) else [std] * 3)) if d.get("do_normalize") and std is not None else None)
    return Processing(image=record)


def sample_images() -> tuple[list[bytes], tuple[str, ...]]:
    """Images nobody tunes for, as encoded files: JPEG, PNG and WebP; square, wide and tall; grayscale, RGBA and
    palette; one whose EXIF orientation says to turn it. Drawn here from a fixed seed."""
    import io

    from PIL import Image
    rng = np.random.default_rng(0)

    def picture(w: int, h: int) -> Image.Image:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1)
        noise = rng.integers(0, 40, (h, w, 3))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")

    def save(image, fmt: str, **kw) -> bytes:
        out = io.BytesIO()
        image.save(out, fmt, **kw)
        return out.getvalue()
    rotated = picture(48, 24)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    cases = {
        "JPEG 64x64 RGB": save(picture(64, 64), "JPEG", quality=90),
        "PNG 80x40 wide": save(picture(80, 40), "PNG"),
        "PNG 30x90 tall": save(picture(30, 90), "PNG"),
        "PNG grayscale": save(picture(50, 50).convert("L"), "PNG"),
        "PNG RGBA": save(picture(40, 40).convert("RGBA"), "PNG"),
        "PNG palette": save(picture(36, 36).convert("P"), "PNG"),
        "WebP 33x33": save(picture(33, 33), "WEBP", quality=90),
        "JPEG with EXIF orientation 6": save(rotated, "JPEG", quality=90, exif=exif),
        "JPEG 7x5 tiny": save(picture(7, 5), "JPEG", quality=90),
    }
    return list(cases.values()), tuple(cases)


def image_cases(model, processing: Processing, folder: Path) -> RawCases:
    """Image files through the bundle's pipeline (Pillow and numpy) and through transformers' own (its ``load_image``:
    EXIF orientation and RGB, then the model's image processor, then the model in eager fp32), item by item."""
    import io

    import torch
    from PIL import Image
    from transformers.image_utils import load_image
    files, cases = sample_images()
    feeds = pipeline(processing, folder).encode(files)
    want_pixels = model.image_processor([load_image(Image.open(io.BytesIO(f))) for f in files],
                                        return_tensors="np")["pixel_values"].astype(np.float32)
    got_pixels = feeds[processing.image.tensor]
    pixel_error = float(np.abs(got_pixels - want_pixels).max()) if got_pixels.shape == want_pixels.shape else float("inf")
    names = model.spec.output_names
    out = processing.labels.output if processing.labels else names[0]
    with torch.inference_mode():
        ref = model.module(torch.from_numpy(want_pixels))
    want = ref[names.index(out)].float().numpy().astype(np.float64).reshape(len(files), -1)
    return RawCases("image", feeds, out, want, "transformers' load_image and image processor, then the model in eager "
                    "fp32", cases, pixel_error <= 1e-3, max_input_error=pixel_error, labels=processing.labels is not None)


def check_image(model, processing: Processing, folder: Path, run: Runner, floor: float) -> ProcessingCheck:
    """Image files through the bundle's pipeline and ``run`` (a variant) against transformers' own, item by item
    (``image_cases``): pixel values, outputs, and the best label of a classifier (where a cosine floor is in force: a
    budget on a task metric allows some labels to change)."""
    cases = image_cases(model, processing, folder)
    return cases.check(run(cases.feeds), floor)
