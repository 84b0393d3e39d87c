"""The typed records of a bundle's processing (in its manifest): what turns raw input into the model's tensors, and
the end-to-end check it passed when the bundle was built."""
from __future__ import annotations

from typing import Annotated

import msgspec

PIPELINE_FLOOR = 0.9999  # the cosine each item keeps through the pipeline in fp32 (a plain variant; the source model)
Length = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][\w.]{0,127}$")]


class TextProcessing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Text in: one string an item, tokenized, truncated to ``max_length`` tokens, padded to the longest of a batch."""

    input: Name = "text"  # the raw input's name (a BYTES tensor in the Open Inference Protocol)
    tokenizer: str = "tokenizer.json"  # a file of the bundle
    max_length: Length  # tokens, special tokens included
    truncate: bool = True  # False: text over max_length is refused (400) instead of cut
    ids: Name = "input_ids"
    mask: Name | None = "attention_mask"
    type_ids: Name | None = None
    pad_id: int = 0
    vocab_size: Length | None = None  # token ids given directly (OpenAI's token arrays) must lie below it
    output: Name | None = None  # the output that answers a text (an embedding); None: every output


class ProcessingCheck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Raw input through the bundle's pipeline against the original library's pipeline, on the same items."""

    reference: str  # what the bundle was compared with, in words
    items: int
    cases: tuple[str, ...]  # the kinds of input checked (long, empty, non-ASCII, ...)
    min_cosine: float
    max_abs_error: float
    inputs_equal: bool  # the bundle's pipeline gave the reference's model inputs: the same token ids, or pixels within 1e-3
    max_input_error: float = 0.0  # the largest difference in those inputs (pixel values)
    labels_equal: bool | None = None  # a classifier: the same best label on every item
    passed: bool
    floor: float  # the cosine each item had to reach (0.0: none: a task-metric budget, the variant's own error unknown)
    kind: str = "text"  # text or image
    # the source model in eager fp32 through the same pipeline, against the reference (where that is another library's
    # pipeline: sentence-transformers): at PIPELINE_FLOOR or more, a shortfall above is the variant's, not the pipeline's
    source_min_cosine: float | None = None

    @property
    def variant_fault(self) -> bool:
        """Failed, while the pipeline itself is right: the same model inputs, and the source model agreeing with the
        reference through it. Another variant may pass."""
        return not self.passed and self.inputs_equal and (self.source_min_cosine is None
                                                          or self.source_min_cosine >= PIPELINE_FLOOR)




class ImageProcessing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Image in: an encoded file's bytes (JPEG, PNG, WebP, ...), decoded with Pillow, turned upright by its EXIF
    orientation, converted to RGB, then the model's image processor's steps (``preprocessor_config.json``) in numpy:
    resize, center crop, rescale, normalize, channels first."""

    input: Name = "image"  # the raw input's name (a BYTES tensor: one encoded image an item)
    tensor: Name = "pixel_values"  # the model input it feeds
    size: tuple[int, int] | None = None  # resize to (height, width)
    shortest_edge: int | None = None  # or: the shorter side to this, keeping the aspect ratio
    crop_pct: float | None = None  # ConvNeXt's way: shortest_edge / crop_pct, then a square center crop
    crop: tuple[int, int] | None = None  # center crop to (height, width)
    resample: int = 2  # Pillow's filter (2 bilinear, 3 bicubic)
    rescale: float | None = None  # pixel values times this (1/255)
    mean: tuple[float, ...] | None = None  # then (x - mean) / std per channel
    std: tuple[float, ...] | None = None
    max_pixels: Annotated[int, msgspec.Meta(ge=1)] = 50_000_000  # width x height, refused before decoding (decompression bombs)


class Labels(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A classifier's answer in its own terms: the label of each class (``id2label``) and its softmax score."""

    output: Name  # the logits these label
    names: tuple[str, ...]


class Processing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    text: TextProcessing | None = None
    image: ImageProcessing | None = None
    labels: Labels | None = None
    check: ProcessingCheck | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.text.tokenizer,) if self.text else ()

    @property
    def raw(self) -> str | None:
        """The raw input's name (text or image), if the bundle takes one."""
        return self.text.input if self.text else self.image.input if self.image else None
