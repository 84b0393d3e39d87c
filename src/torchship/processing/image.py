"""Images to the model's pixel tensor with Pillow and numpy, as the model's image processor declares.

The steps are those of transformers' own (Pillow) image processors, in their order: decode, EXIF orientation, RGB,
resize (Pillow, the declared filter), center crop, rescale, normalize, channels first. An image is checked before
it is decoded: its header's width x height against ``max_pixels`` (a small file can claim a huge image).
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np

from ..errors import SpecError
from .records import ImageProcessing


def _pil():
    from PIL import Image, ImageOps
    return Image, ImageOps


class ImagePipeline:
    kind = "image"

    def __init__(self, record: ImageProcessing):
        self.record = record

    @staticmethod
    def tokens(feeds: dict[str, np.ndarray]) -> int:
        return 0  # images have no tokens to count

    @property
    def input(self) -> str:
        return self.record.input

    def open(self, data, i: int = 0):
        """One item as an upright RGB Pillow image: encoded bytes (refused, with the reason, when they are not an
        image or claim more than ``max_pixels``), or a Pillow image as it is."""
        Image, ImageOps = _pil()
        if isinstance(data, Image.Image):
            image = data
        else:
            limit = self.record.max_pixels
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(bytes(data)))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise SpecError(f"input {self.input!r}: item {i} is over the limit of {limit:,} pixels ({exc})") from None
            except Exception as exc:
                raise SpecError(f"input {self.input!r}: item {i} is not an image Pillow can read "
                                f"({type(exc).__name__}: {str(exc)[:120]})") from None
            w, h = image.size
            if w * h > limit:
                raise SpecError(f"input {self.input!r}: item {i} is {w}x{h} pixels, over the limit of {limit:,} pixels")
            try:
                image.load()
            except Exception as exc:
                raise SpecError(f"input {self.input!r}: item {i} could not be decoded ({type(exc).__name__}: "
                                f"{str(exc)[:120]})") from None
        return ImageOps.exif_transpose(image).convert("RGB")

    def pixels(self, image) -> np.ndarray:
        """The steps after decoding, on one upright RGB image: (channels, height, width) float32."""
        r = self.record
        if r.size:
            image = image.resize((r.size[1], r.size[0]), resample=r.resample)
        elif r.shortest_edge:
            if r.crop_pct is not None and r.shortest_edge < 384:  # ConvNeXt: resize past the crop, then crop
                image = _shortest(image, int(r.shortest_edge / r.crop_pct), r.resample)
                image = _center_crop(image, (r.shortest_edge, r.shortest_edge))
            elif r.crop_pct is not None:
                image = image.resize((r.shortest_edge, r.shortest_edge), resample=r.resample)
            else:
                image = _shortest(image, r.shortest_edge, r.resample)
        if r.crop:
            image = _center_crop(image, r.crop)
        x = np.asarray(image).transpose(2, 0, 1)
        if r.rescale is not None:
            x = (x.astype(np.float64) * r.rescale).astype(np.float32)
        x = x.astype(np.float32)
        if r.mean is not None and r.std is not None:
            x = (x - np.asarray(r.mean, np.float32)[:, None, None]) / np.asarray(r.std, np.float32)[:, None, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def encode(self, items: Sequence) -> dict[str, np.ndarray]:
        if not len(items):
            raise SpecError(f"input {self.input!r}: no image given (an empty list)")
        return {self.record.tensor: np.stack([self.pixels(self.open(x, i)) for i, x in enumerate(items)])}


def _shortest(image, size: int, resample: int):
    """The shorter side to ``size``, the longer in proportion (rounded down), as transformers does."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize(new, resample=resample)


def _center_crop(image, size: tuple[int, int]):
    """The middle ``size`` (height, width); an image smaller than that is padded with zeros around it."""
    Image, _ = _pil()
    w, h = image.size
    ch, cw = size
    if w < cw or h < ch:
        canvas = Image.new("RGB", (max(w, cw), max(h, ch)))
        canvas.paste(image, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
        image, (w, h) = canvas, canvas.size
    top, left = (h - ch) // 2, (w - cw) // 2
    return image.crop((left, top, left + cw, top + ch))
