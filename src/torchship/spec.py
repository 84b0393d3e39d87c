"""IOSpec: a model's inputs and outputs (name, dtype, shape with symbolic dims).

Written on the command line as ``NAME:DTYPE[DIM,...]``, e.g. ``x:float32[batch,1,28,28]``, and for integer inputs
optionally with the range of their values, ``ids:int64[batch,seq]{0:50}`` (0 <= id < 50). A bound may follow a
dimension, ``lengths:int64[batch]{1:seq+1}`` (1 <= length <= seq, whatever seq is in a batch): lengths, valid counts,
positions. A dimension is an int or a symbol; the first dimension named ``batch`` is the batch axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

import numpy as np

from .errors import SpecError

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
_SPEC_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*(\w+)\s*\[([^\]]*)\]\s*(?:\{\s*([^:{}]+?)\s*:\s*([^:{}]+?)\s*\})?\s*$")
_BOUND_RE = re.compile(r"^(-?\d+)$|^([A-Za-z_]\w*)\s*(?:([+-])\s*(\d+))?$")
_SYMBOL_RE = re.compile(r"^[A-Za-z_]\w*$")
BATCH = "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # of int | str
    range: tuple[int | str, int | str] | None = None  # integer inputs: values lie in [low, high); a bound may be
    # a dimension's size plus or minus a number ("seq+1")

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise SpecError(f"{self.name}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.range is not None:
            if not self.dtype.startswith(("int", "uint")) or len(self.range) != 2:
                raise SpecError(f"{self.name}: range {self.range} must be low < high, for an integer input")
            bounds = tuple(_bound(b, self.name) for b in self.range)
            if all(isinstance(b, int) for b in bounds) and bounds[0] >= bounds[1]:
                raise SpecError(f"{self.name}: range {self.range} must be low < high, for an integer input")
            object.__setattr__(self, "range", bounds)
        for d in self.shape:
            if isinstance(d, bool) or not (isinstance(d, str) and _SYMBOL_RE.match(d) or isinstance(d, int) and d > 0):
                raise SpecError(f"{self.name}: dimension {d!r} must be a positive int or a name such as 'batch'")

    @classmethod
    def parse(cls, text: str) -> "TensorSpec":
        m = _SPEC_RE.match(text)
        if not m:
            raise SpecError(f"cannot parse {text!r}: write NAME:DTYPE[DIM,...], e.g. x:float32[batch,3,28,28]")
        name, dtype, dims, low, high = m.groups()
        parts = [p.strip() for p in dims.split(",")] if dims.strip() else []
        if any(not p for p in parts):
            raise SpecError(f"cannot parse {text!r}: empty dimension between commas")
        shape = tuple(int(p) if p.isdigit() else p for p in parts)
        return cls(name, dtype, shape, (low, high) if low is not None else None)

    @property
    def tied(self) -> bool:
        """Its range follows a dimension's size (``{1:seq+1}``)."""
        return self.range is not None and any(isinstance(b, str) for b in self.range)

    def bounds(self, sizes: Mapping[str, int]) -> tuple[int, int]:
        """The range as numbers, with the dimensions' sizes in ``sizes``."""
        low, high = (_resolve(b, sizes, self.name) for b in self.range)
        if low >= high:
            raise SpecError(f"input {self.name!r}: its range [{self.range[0]}, {self.range[1]}) is empty here "
                            f"({', '.join(f'{k}={v}' for k, v in sizes.items())})")
        return low, high

    def __str__(self) -> str:
        values = f"{{{self.range[0]}:{self.range[1]}}}" if self.range else ""
        return f"{self.name}:{self.dtype}[{','.join(str(d) for d in self.shape)}]{values}"

    @property
    def batch_axis(self) -> int | None:
        return self.shape.index(BATCH) if BATCH in self.shape else None

    def concrete(self, batch: int, dims: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif d == BATCH:
                out.append(batch)
            elif d in dims:
                out.append(int(dims[d]))
            else:
                raise SpecError(f"{self.name}: no size given for dimension {d!r}; pass --dim {d}=N")
        return tuple(out)

    @cached_property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def check(self, array: np.ndarray) -> None:
        """Raise SpecError naming what is wrong when ``array`` does not fit this spec."""
        if array.dtype != self.np_dtype:
            raise SpecError(f"input {self.name!r}: expected dtype {self.dtype}, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise SpecError(f"input {self.name!r}: expected {len(self.shape)} dimensions {list(self.shape)}, got shape {list(array.shape)}")
        for i, (want, got) in enumerate(zip(self.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise SpecError(f"input {self.name!r}: dimension {i} must be {want}, got {got} (shape {list(array.shape)})")
            if got == 0:
                raise SpecError(f"input {self.name!r}: dimension {i} is empty")
        if self.range is not None and not self.tied and array.size:
            low, high = int(array.min()), int(array.max())
            if low < self.range[0] or high >= self.range[1]:
                raise SpecError(f"input {self.name!r}: values must lie in [{self.range[0]}, {self.range[1]}), got "
                                f"{low} to {high}")

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "range": self.range}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]), tuple(d["range"]) if d.get("range") else None)


def _bound(b, name: str) -> int | str:
    """A range bound: a number, or a dimension's name plus or minus a number, normalized ("seq+1")."""
    if isinstance(b, int) and not isinstance(b, bool):
        return b
    m = _BOUND_RE.match(str(b).strip())
    if not m:
        raise SpecError(f"{name}: range bound {b!r} must be a number or a dimension plus or minus one, e.g. seq+1")
    if m.group(1) is not None:
        return int(m.group(1))
    return m.group(2) + (f"{m.group(3)}{int(m.group(4))}" if m.group(3) and int(m.group(4)) else "")


def _resolve(b: int | str, sizes: Mapping[str, int], name: str) -> int:
    if isinstance(b, int):
        return b
    m = _BOUND_RE.match(b)
    symbol, sign, n = m.group(2), m.group(3), int(m.group(4) or 0)
    if symbol not in sizes:
        raise SpecError(f"input {name!r}: its range follows dimension {symbol!r}, which no input has")
    return sizes[symbol] + (n if sign == "+" else -n)


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = field(default=())

    @classmethod
    def parse(cls, inputs: list[str], outputs: list[str] = ()) -> "IOSpec":
        spec = cls(tuple(TensorSpec.parse(t) for t in inputs), tuple(TensorSpec.parse(t) for t in outputs))
        names = [t.name for t in spec.inputs]
        if len(set(names)) != len(names):
            raise SpecError(f"input names repeat: {names}")
        known = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
        for t in spec.inputs:
            for b in t.range or ():
                symbol = _BOUND_RE.match(b).group(2) if isinstance(b, str) else None
                if symbol is not None and symbol not in known:
                    raise SpecError(f"{t.name}: its range follows dimension {symbol!r}, which no input has "
                                    f"(dimensions: {sorted(known)})")
        if not spec.inputs:
            raise SpecError("at least one input is needed, e.g. --input x:float32[batch,3,28,28]")
        return spec

    # computed once (the spec is frozen): requests look them up on every call
    @cached_property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @cached_property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @cached_property
    def by_name(self) -> dict[str, TensorSpec]:
        """The inputs by name."""
        return {t.name: t for t in self.inputs}

    @property
    def symbols(self) -> list[str]:
        """Dynamic dimension names other than batch, in order of first use."""
        seen: list[str] = []
        for t in self.inputs:
            seen += [d for d in t.shape if isinstance(d, str) and d != BATCH and d not in seen]
        return seen

    @property
    def has_batch(self) -> bool:
        return all(t.batch_axis == 0 for t in self.inputs)

    def check(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Validate feeds against the inputs; return the batch size."""
        names = self.by_name
        if len(feeds) != len(names) or any(n not in names for n in feeds):
            missing = [n for n in self.input_names if n not in feeds]
            unknown = [n for n in feeds if n not in names]
            raise SpecError(f"inputs must be {self.input_names}; missing {missing}, unknown {unknown}")
        sizes: dict[str, int] = {}
        for t in self.inputs:
            a = feeds[t.name]
            t.check(a)
            for d, got in zip(t.shape, a.shape):
                if isinstance(d, str) and sizes.setdefault(d, got) != got:
                    raise SpecError(f"dimension {d!r} is {sizes[d]} in one input and {got} in {t.name!r}")
        for t in self.inputs:
            a = feeds[t.name]
            if t.tied and a.size:
                low, high = t.bounds(sizes)
                got = (int(a.min()), int(a.max()))
                if got[0] < low or got[1] >= high:
                    where = ", ".join(f"{s} is {sizes[s]}" for s in self.symbols if s in str(t.range))
                    raise SpecError(f"input {t.name!r}: values must lie in [{t.range[0]}, {t.range[1]}) = [{low}, {high}) "
                                    f"here ({where}), got {got[0]} to {got[1]}")
        return sizes.get(BATCH, 1)

    def sample(self, batch: int, dims: Mapping[str, int] | None = None, seed: int = 0,
               int_high: int = 100) -> dict[str, np.ndarray]:
        """Generate inputs that fit the spec: normal floats, ints within each input's range (else [0, int_high)),
        ones for masks and bools."""
        rng = np.random.default_rng(seed)
        feeds, sizes = {}, {BATCH: batch, **(dims or {})}
        for t in self.inputs:
            shape = t.concrete(batch, dims or {})
            if t.dtype.startswith("float"):
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
            elif t.dtype == "bool" or t.name.endswith("mask"):
                feeds[t.name] = np.ones(shape, dtype=t.dtype)
            else:
                low, high = (t.bounds(sizes) if t.tied else t.range) or (0, int_high)
                feeds[t.name] = rng.integers(low, high, size=shape).astype(t.dtype)
        self._pad_past_lengths(feeds)
        return feeds

    def _pad_past_lengths(self, feeds: dict[str, np.ndarray]) -> None:
        """Where an input's values are lengths along a dimension (``{1:seq+1}``, one an item), the positions of the
        other inputs past each item's length are zeros, as a user's padding would be."""
        for t in self.inputs:
            top = t.range[1] if t.tied and len(t.shape) == 1 and t.shape[0] == BATCH else None
            symbol = _BOUND_RE.match(top).group(2) if isinstance(top, str) else None
            if symbol is None:
                continue
            lengths = feeds[t.name]
            for u in self.inputs:
                if u is t or len(u.shape) < 2 or u.shape[0] != BATCH or u.shape[1] != symbol:
                    continue
                a = feeds[u.name]
                for i, n in enumerate(lengths):
                    a[i, max(int(n), 0):] = 0

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "IOSpec":
        return cls(tuple(map(TensorSpec.from_dict, d["inputs"])), tuple(map(TensorSpec.from_dict, d.get("outputs", ()))))

    def __str__(self) -> str:
        return " ".join(map(str, self.inputs)) + " -> " + " ".join(map(str, self.outputs))


def batches(feeds: Mapping[str, np.ndarray], size: int):
    """``feeds`` cut along the batch axis into batches of at most ``size`` items."""
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in feeds.items()}


def concat_batches(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
