"""Raw input over the protocol: BYTES tensors of text, turned into the model's tensors by the bundle's pipeline.

An element of a BYTES tensor is a JSON string, or, in the binary tensor extension and gRPC's raw contents, Triton's
form: a 4-byte little-endian length, then that many bytes. Text must be UTF-8; each item and the item count have a
limit, so that no request makes the server tokenize more than it was sized for.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Sequence

import msgspec

from ..errors import BadRequest

_STRINGS = msgspec.json.Decoder(list[str])
_NESTED = msgspec.json.Decoder(list[list[str]])


@dataclass(frozen=True)
class RawLimits:
    max_items: int = 1024  # items (strings) in one request
    max_item_bytes: int = 64 * 1024  # bytes of one string (UTF-8)


@dataclass
class Decoded:
    """One request as its wire decoded it: tensors given directly, or raw text, or token arrays (OpenAI)."""

    request: Any  # the wire's own request record (what its answer is encoded from)
    feeds: dict | None = None
    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    deadline: float | None = None


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


def texts(values: Sequence[bytes | str], count: int, name: str, limits: RawLimits) -> list[str]:
    """The items as text, checked: as many as the shape says, within the limits, UTF-8."""
    if len(values) != count:
        raise BadRequest(f"input {name!r}: {len(values)} strings do not fill its shape ({count} items)")
    if count == 0:
        raise BadRequest(f"input {name!r}: no text given (shape with no items)")
    if count > limits.max_items:
        raise BadRequest(f"input {name!r}: {count} items, over the limit of {limits.max_items} a request "
                         "(--max-items): send them in several requests")
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
