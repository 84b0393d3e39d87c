"""Raw input over the protocol: BYTES tensors of text or images, turned into the model's tensors by the bundle's
pipeline.

An element of a BYTES tensor is a JSON string, or, in the binary tensor extension and gRPC's raw contents, Triton's
form: a 4-byte little-endian length, then that many bytes. Text must be UTF-8; an image is its encoded file (in JSON, a
base64 string). Each item and the item count have a limit, so that no request makes the server tokenize or decode
more than it was sized for.
"""
from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import msgspec

from ..errors import BadRequest

_STRINGS = msgspec.json.Decoder(list[str])
_NESTED = msgspec.json.Decoder(list[list[str]])


@dataclass(frozen=True)
class RawLimits:
    max_items: int = 1024  # items (strings or images) in one request
    max_item_bytes: int = 64 * 1024  # bytes of one string (UTF-8)
    max_image_bytes: int = 16 * 2**20  # bytes of one encoded image


@dataclass(frozen=True)
class RawInput:
    """The raw input a bundle takes: its name, and whether it is text or images."""

    name: str
    kind: Literal["text", "image"]


@dataclass
class Decoded:
    """One request as its wire decoded it: tensors given directly, or raw items (texts or encoded images), or token
    arrays (OpenAI); ``top_k``: how many labels a classifier answers with."""

    request: Any  # the wire's own request record (what its answer is encoded from)
    feeds: dict | None = None
    items: list | None = None
    ids: list[list[int]] | None = None
    deadline: float | None = None
    top_k: int = 1


def split_bytes(raw: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """``count`` elements of Triton's serialized BYTES form (each a uint32 little-endian length, then its bytes),
    which must fill ``raw`` exactly."""
    out, offset, view = [], 0, memoryview(raw)
    for i in range(count):
        if offset + 4 > len(view):
            raise BadRequest(f"input {name!r}: BYTES data ends before element {i} of {count} (each element is a "
                             "4-byte little-endian length, then its bytes)")
        (n,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + n > len(view):
            raise BadRequest(f"input {name!r}: BYTES element {i} says {n} bytes, but only {len(view) - offset} are left")
        out.append(bytes(view[offset:offset + n]))
        offset += n
    if offset != len(view):
        raise BadRequest(f"input {name!r}: {len(view) - offset} bytes of BYTES data are left over after {count} elements")
    return out


def serialize_bytes(a) -> bytes:
    """A BYTES tensor (an object array of str or bytes) in Triton's binary form: each element's 4-byte little-endian
    length, then its bytes (str as UTF-8)."""
    parts = []
    for v in a.reshape(-1):
        b = v.encode() if isinstance(v, str) else bytes(v)
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def json_strings(data: bytes, name: str) -> list[str]:
    """A BYTES tensor's JSON data: a list of strings (or a list of lists of strings, flattened)."""
    try:
        return _STRINGS.decode(data)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise BadRequest(f"input {name!r}: data is not JSON: {exc}") from None
    try:
        return [s for row in _NESTED.decode(data) for s in row]
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise BadRequest(f"input {name!r}: BYTES data must be a list of strings") from None


def items(values: Sequence[bytes | str], count: int, raw: RawInput, limits: RawLimits) -> list:
    """The items checked (as many as the shape says, within the limits): text as str (UTF-8), images as bytes (a
    JSON string is base64)."""
    name = raw.name
    if len(values) != count:
        raise BadRequest(f"input {name!r}: {len(values)} strings do not fill its shape ({count} items)")
    if count == 0:
        raise BadRequest(f"input {name!r}: no {raw.kind} given (shape with no items)")
    if count > limits.max_items:
        raise BadRequest(f"input {name!r}: {count} items, over the limit of {limits.max_items} a request "
                         "(--max-items): send them in several requests")
    if raw.kind == "image":
        return [_image(v, i, name, limits) for i, v in enumerate(values)]
    return texts(values, name, limits)


def _image(v: bytes | str, i: int, name: str, limits: RawLimits) -> bytes:
    if isinstance(v, str):
        try:
            v = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"input {name!r}: item {i} is not base64 (in JSON, an image is its file's bytes in "
                             "base64; or send them as binary data)") from None
    if len(v) > limits.max_image_bytes:
        raise BadRequest(f"input {name!r}: item {i} has {len(v):,} bytes, over the limit of {limits.max_image_bytes:,} "
                         "(--max-image-mb)")
    return v


def texts(values: Sequence[bytes | str], name: str, limits: RawLimits) -> list[str]:
    """The items as text: each within the byte limit, UTF-8."""
    out = []
    for i, v in enumerate(values):
        size = len(v) if isinstance(v, bytes) else len(v) if len(v) * 4 <= limits.max_item_bytes else len(v.encode())
        if size > limits.max_item_bytes:
            raise BadRequest(f"input {name!r}: item {i} has {size} bytes, over the limit of {limits.max_item_bytes} "
                             "(--max-item-kb)")
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"input {name!r}: item {i} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        out.append(v)
    return out
