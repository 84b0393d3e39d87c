"""Control flow on a model's values: found once per model, before any graph is traced.

A traced or exported graph keeps only the path its example took; no sampling proves that a rare branch is never taken.
Dynamo sees such a branch as it captures the forward (a jump on a tensor's value, ``generic_jump``; a tensor turned
into a Python number) and names the line; a branch on a shape is a guard, not a jump, and is not reported. Each place
is a ``Branch`` record (file, line, the source line) that the plan, the report, the manifest and ``check`` share.

Captures are then judged by what they keep: eager, torch.compile (its guards check the condition again on every call)
and TorchScript's script keep the branch; a trace or an export (TorchScript trace, ONNX, OpenVINO, AOTInductor, and
every int8 or bf16 variant built on them) keeps one path, so for such a model they are not candidates unless the
user consents to specializing (``--allow-specialization``), which the manifest records.
"""
from __future__ import annotations

import msgspec

from .runtimes.base import DESCRIPTORS

# runtimes whose graph is a trace or an export of one path (their descriptors say so); TorchScript traces too, but
# scripts where told: for such a model it is built by script, which keeps the branch
SPECIALIZING = tuple(r for r, d in DESCRIPTORS.items() if d.specializes)


class Branch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    file: str
    line: int
    code: str  # the source line
    reason: str = ""  # what dynamo saw there, in its words

    def __str__(self) -> str:
        return f"{self.file}:{self.line} `{self.code}`"


def specialized(variant) -> bool:
    """The variant's graph keeps one path of the model's control flow: a trace or an export."""
    artifact = getattr(variant, "artifact", None)
    return variant.runtime in SPECIALIZING or (variant.runtime == "torchscript" and artifact is not None
                                               and artifact.options.mode == "trace")


def describe(branches: tuple[Branch, ...]) -> str:
    """The places in one line: the first few, and how many more."""
    shown = "; ".join(map(str, branches[:3]))
    return shown + (f" and {len(branches) - 3} more" if len(branches) > 3 else "")


def why_not(branches: tuple[Branch, ...]) -> str:
    """The reason a specializing variant of such a model is not built."""
    return (f"the model branches on its values at {describe(branches)}: a traced or exported graph keeps only the "
            "path its example took (pass --allow-specialization if that branch never fires in production)")


_DATA = ("generic_jump", "data-dependent", "data dependent", "Tensor.item", "item()")


def find_branches(module, args: tuple) -> tuple[Branch, ...]:
    """Every place in ``module``'s forward where it branches on (or reads out) a tensor's value, run on ``args``,
    as dynamo found them; () when there is none. Raises what dynamo raises where it cannot capture the model."""
    import logging
    import warnings

    import torch
    import torch._dynamo as dynamo  # explain is dynamo's own way of listing where and why a capture breaks
    found: dict[tuple[str, int], Branch] = {}
    quiet = logging.getLogger("torch._dynamo")
    level = quiet.level
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)  # dynamo logs each break it explains; the records below say it once
        dynamo.reset()
        try:
            explained = dynamo.explain(module)(*args)
        finally:
            dynamo.reset()
            quiet.setLevel(level)
    for b in explained.break_reasons:
        if not any(key in b.reason for key in _DATA) or not b.user_stack:
            continue
        frame = b.user_stack[-1]
        key = (frame.filename, frame.lineno)
        if key not in found:
            found[key] = Branch(frame.filename, int(frame.lineno), (frame.line or "").strip(),
                                b.reason.strip().splitlines()[0][:200])
    return tuple(found.values())
