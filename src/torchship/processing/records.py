"""The typed records of a bundle's processing (in its manifest): what turns raw input into the model's tensors, and
the end-to-end check it passed when the bundle was built."""
from __future__ import annotations

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
