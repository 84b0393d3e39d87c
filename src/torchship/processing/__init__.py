"""Raw input to the model's tensors, and its outputs to answers: data in the bundle, never code.

A bundle's ``processing`` record (in its manifest) says how raw input becomes the model's inputs. Text: the
tokenizer's own ``tokenizer.json`` (Hugging Face ``tokenizers``, in Rust: nothing from the model's directory runs as
Python), the length it truncates to, and which input each of its results feeds (``text.py``). Images: the image
processor's declared steps, run with Pillow and numpy (``image.py``). A classifier's answer carries its labels and
scores (``labels.py``). Pooling and normalization are part of the verified graph (``zoo:minilm`` and
sentence-transformers directories give a normalized embedding). ``check`` is the end-to-end comparison made when the
bundle was built (``build.py``, at optimize time): raw input through the bundle's pipeline against the original
library's own pipeline on the same items. A padded batch runs as runs of similar lengths (``lengths.py``).

Nothing here but ``build.py`` imports torch or transformers: a served bundle needs ``tokenizers`` and Pillow.
"""
from __future__ import annotations

from pathlib import Path

from .records import ImageProcessing, Labels, Processing, ProcessingCheck, TextProcessing


def pipeline(processing: Processing | None, folder: Path):
    """The raw-input pipeline of a bundle's ``processing`` (files read from ``folder``), or None without one."""
    if processing is not None and processing.text is not None:
        from .text import TextPipeline
        return TextPipeline(processing.text, Path(folder))
    if processing is not None and processing.image is not None:
        from .image import ImagePipeline
        return ImagePipeline(processing.image)
    return None


__all__ = ["ImageProcessing", "Labels", "Processing", "ProcessingCheck", "TextProcessing", "pipeline"]
