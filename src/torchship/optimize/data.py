"""The data optimize works on: the user's held-out and calibration files, and the verification inputs."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SpecError, UsageError

POOL_LIMIT = 256


def read_arrays(data, spec, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs named as the IOSpec's (and optional ``labels``) from a .npz or .safetensors file or a dict of arrays."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            if path.suffix == ".safetensors":
                from safetensors.numpy import load_file
                arrays = load_file(str(path))
            else:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise UsageError(f"--{what} {path}: not a readable .npz or .safetensors file ({str(exc).splitlines()[0]})") from exc
    else:
        arrays = {k: np.asarray(v) for k, v in dict(data).items()}
    labels = arrays.pop("labels", None)
    try:
        n = spec.check(arrays)
    except SpecError as exc:
        raise UsageError(f"--{what} does not fit the model's inputs: {exc}") from exc
    if labels is not None and len(labels) != n:
        raise UsageError(f"--{what}: {len(labels)} labels for {n} items")
    return arrays, labels


def raw_arrays(data) -> dict[str, np.ndarray] | None:
    """The arrays of a .npz/.safetensors file or dict, unchecked (None where they cannot be read: ``with_data``
    says why later)."""
    if data is None:
        return None
    try:
        if isinstance(data, (str, Path)):
            if Path(data).suffix == ".safetensors":
                from safetensors.numpy import load_file
                return load_file(str(data))
            with np.load(data, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return {k: np.asarray(v) for k, v in dict(data).items()}
    except Exception:
        return None


def with_data(model, eval_data, calibration_data, warn: Callable[[str], None]):
    """The model with the user's held-out (``eval_data``) and calibration inputs; data that does not fit is one
    line through ``warn`` and the run goes on without it."""
    for what, data in (("eval-data", eval_data), ("calibration-data", calibration_data)):
        if data is None:
            continue
        try:
            arrays, labels = read_arrays(data, model.spec, what)
        except UsageError as exc:
            warn(f"{exc}; going on without it")
            continue
        model = (replace(model, eval_data=arrays, labels=labels) if what == "eval-data"
                 else replace(model, calibration_data=arrays))
    return model


def checked_train_data(train_data, warn: Callable[[str], None]):
    """``train_data`` if it can be read, else None after one line through ``warn``."""
    if train_data is None:
        return None
    from ..train.data import load_data
    try:
        load_data(train_data)
    except UsageError as exc:
        warn(f"--train-data: {exc}; going on without the trained variants")
        return None
    return train_data


@dataclass(frozen=True)
class Pool:
    """The inputs every variant is verified on, with labels where known, and a line saying what they are."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    note: str


def verification_pool(model) -> Pool:
    if model.eval_data is not None:
        n = min(POOL_LIMIT, len(next(iter(model.eval_data.values()))))
        labels = model.labels[:n] if model.labels is not None else None
        return Pool({k: np.ascontiguousarray(v[:n]) for k, v in model.eval_data.items()}, labels, f"{n} held-out items")
    return Pool(model.spec.sample(64, model.dims, seed=123), None, "64 items generated from the IOSpec")
