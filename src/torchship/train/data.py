"""Training data: arrays, .npz files, torch Datasets or ``zoo:digits``; checked before any training starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import UsageError

SPLITS = ("train", "val", "test")


def _split(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(len(y))
    a, b = int(0.8 * len(y)), int(0.9 * len(y))
    return {"train": (x[order[:a]], y[order[:a]]), "val": (x[order[a:b]], y[order[a:b]]), "test": (x[order[b:]], y[order[b:]])}


def load_data(data: Any, seed: int = 0) -> dict[str, Dataset]:
    """``data``: ``zoo:digits``; a .npz with x_train/y_train/x_val/y_val[/x_test/y_test] or x/y (split 80/10/10);
    a tuple (x, y); a dict of split -> (x, y) or Dataset."""
    if isinstance(data, (str, Path)):
        text = str(data)
        if text in ("zoo:digits", "zoo:digits-cnn"):
            from ..zoo.digits import dataset
            data = dataset()
        else:
            path = Path(text)
            if not path.is_file() or path.suffix != ".npz":
                raise UsageError(f"--data {text!r}: give zoo:digits or a .npz file with x_train, y_train, x_val, y_val "
                                 "(or x and y, split 80/10/10)")
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if {"x", "y"} <= set(arrays):
                data = _split(arrays["x"], arrays["y"], seed)
            elif {"x_train", "y_train", "x_val", "y_val"} <= set(arrays):
                data = {s: (arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in SPLITS if f"x_{s}" in arrays}
            else:
                raise UsageError(f"{path} holds {sorted(arrays)}; expected x and y, or x_train, y_train, x_val, y_val")
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], Dataset):
        data = _split(np.asarray(data[0]), np.asarray(data[1]), seed)
    if not isinstance(data, dict) or "train" not in data:
        raise UsageError("training data must be (x, y) arrays, a dict with 'train' (and 'val'), a .npz file or zoo:digits")
    out = {}
    for split, part in data.items():
        if isinstance(part, Dataset):
            out[split] = part
            continue
        x, y = (np.asarray(a) for a in part)
        if len(x) != len(y):
            raise UsageError(f"{split}: {len(x)} inputs but {len(y)} targets")
        out[split] = TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
    for split, ds in out.items():
        if len(ds) == 0:
            raise UsageError(f"the {split} split is empty: nothing to train or validate on")
    if "val" not in out:
        raise UsageError("a validation split is needed for early stopping and the best checkpoint (add 'val' or x_val/y_val)")
    return out


def augment_images(x: torch.Tensor, generator: torch.Generator | None = None, shift: int = 2, degrees: float = 10.0,
                   noise: float = 0.05) -> torch.Tensor:
    """Random shifts (up to ``shift`` px), small rotations and Gaussian noise for [N, C, H, W] images."""
    if x.ndim != 4:
        return x
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * degrees * torch.pi / 180
    dx, dy = ((torch.randint(-shift, shift + 1, (2, n), generator=generator).float() * 2) / torch.tensor(x.shape[-2:]).flip(0)[:, None])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1).to(x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid.to(x.device), align_corners=False, padding_mode="zeros")
    return out + noise * torch.randn(out.shape, generator=generator).to(out)
