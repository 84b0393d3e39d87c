"""Raw input to the model's tensors, and its outputs to answers: data in the bundle, never code.

A bundle's ``processing`` record (in its manifest) says how text becomes the model's inputs: the tokenizer's own
``tokenizer.json`` (Hugging Face ``tokenizers``, in Rust: nothing from the model's directory runs as Python), the
length it truncates to, and which input each of its results feeds. Pooling and normalization are part of the verified
graph (``zoo:minilm`` and sentence-transformers directories give a normalized embedding), so what a client gets back
is the answer. ``check`` is the end-to-end comparison made when the bundle was built: raw text through the bundle's
pipeline against the original library's own pipeline on the same text.

This module imports neither torch nor transformers: a served bundle needs only ``tokenizers``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

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
    tokens_equal: bool  # the bundle's tokenizer gave the reference tokenizer's ids on every item
    passed: bool
    floor: float  # the cosine each item had to reach


class Processing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    text: TextProcessing | None = None
    check: ProcessingCheck | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.text.tokenizer,) if self.text else ()


def pipeline(processing: Processing | None, folder: Path):
    """The raw-input pipeline of a bundle's ``processing`` (files read from ``folder``), or None without one."""
    if processing is None or processing.text is None:
        return None
    from .text import TextPipeline
    return TextPipeline(processing.text, Path(folder))


__all__ = ["Processing", "ProcessingCheck", "TextProcessing", "pipeline"]
