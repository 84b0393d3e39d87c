"""Architecture: how a fresh process builds a model's module again (weights not loaded), as data.

``python``: a ``package.module:attr`` the user named (importing it runs their code, so a bundle that needs it loads
only with consent); ``zoo``: torchship's own; ``hf``: a transformers class by name, from its config (no remote code).
``torchship.modules.rebuild`` turns the record into a module. Nothing here imports torch.
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec


class Architecture(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["python", "zoo", "hf"]
    inputs: tuple[str, ...]  # the forward's inputs, in spec order
    ref: str = ""  # python: package.module:attr; zoo: the zoo name; hf: the transformers class name
    keys: tuple[str, ...] | None = None  # output names to take from a dict-like output, in order
    by_keyword: bool = False  # inputs are passed by name
    config: dict[str, Any] | None = None  # hf: the model's config
    pooling: str | None = None  # hf: "mean" (normalized) or "mean-raw" for sentence embeddings
    kwargs: dict[str, Any] | None = None  # fixed keyword arguments of every call (hf: use_cache=False)

    @property
    def imports(self) -> str | None:
        """The Python module that rebuilding imports and runs, where that is code from outside torchship."""
        if self.kind != "python":
            return None
        module = self.ref.partition(":")[0]
        return None if module == "torchship" or module.startswith("torchship.") else module
