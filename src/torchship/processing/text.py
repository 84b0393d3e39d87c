"""Text to token tensors with the bundle's own ``tokenizer.json`` (Hugging Face ``tokenizers``).

A whole batch is tokenized in one call (``encode_batch`` runs in Rust, across threads, without the GIL) and padded to
its longest item, not to a fixed length: on real sentences, padding is most of the cost of a transformer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MissingExtra, SpecError
from .records import TextProcessing


class TextPipeline:
    kind = "text"

    def __init__(self, record: TextProcessing, folder: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise MissingExtra("tokenizers", "nlp") from exc
        self.record = record
        tok = Tokenizer.from_file(str(Path(folder) / record.tokenizer))
        tok.no_padding()
        if record.truncate:
            tok.enable_truncation(record.max_length)
        else:
            tok.no_truncation()
        self.tokenizer = tok

    @property
    def input(self) -> str:
        return self.record.input

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's inputs for ``texts`` (one item each), padded to the longest."""
        if not len(texts):
            raise SpecError(f"input {self.input!r}: no text given (an empty list)")
        found = self.tokenizer.encode_batch(list(texts))
        return self._tensors([e.ids for e in found], [e.type_ids for e in found])

    def from_ids(self, ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The model's inputs for token ids given directly (as OpenAI's token arrays), checked against the vocabulary
        and truncated (or refused) like text."""
        if not len(ids):
            raise SpecError("no token arrays given (an empty list)")
        vocab, r = self.record.vocab_size, self.record
        rows = []
        for i, row in enumerate(ids):
            row = list(row)
            if not row:
                raise SpecError(f"token array {i} is empty")
            if vocab is not None and (min(row) < 0 or max(row) >= vocab):
                raise SpecError(f"token array {i}: ids must lie in [0, {vocab}), got {min(row)} to {max(row)}")
            rows.append(row[:r.max_length] if r.truncate else row)
        return self._tensors(rows, None)

    def _tensors(self, rows: list[list[int]], types: list[list[int]] | None) -> dict[str, np.ndarray]:
        r = self.record
        longest = max(len(row) for row in rows)
        if longest > r.max_length:
            item = next(i for i, row in enumerate(rows) if len(row) > r.max_length)
            raise SpecError(f"input {r.input!r}: item {item} has {len(rows[item])} tokens, over the {r.max_length} "
                            "the model takes (this bundle refuses longer text instead of truncating it)")
        n = len(rows)
        ids = np.full((n, longest), r.pad_id, dtype=np.int64)
        mask = np.zeros((n, longest), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        feeds = {r.ids: ids}
        if r.mask:
            feeds[r.mask] = mask
        if r.type_ids:
            t = np.zeros((n, longest), dtype=np.int64)
            for i, row in enumerate(types or ()):
                t[i, :len(row)] = row
            feeds[r.type_ids] = t
        return feeds

    def tokens(self, feeds: dict[str, np.ndarray]) -> int:
        """How many real tokens ``feeds`` hold (padding not counted)."""
        mask = self.record.mask
        if mask and mask in feeds:
            return int(feeds[mask].sum())
        return int(feeds[self.record.ids].size)
