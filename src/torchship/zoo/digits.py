"""digits-cnn: a small image classifier for scikit-learn's bundled digits (8x8 upsampled to 28x28)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..spec import IOSpec

SPEC = IOSpec.parse(["image:float32[batch,1,28,28]"])
SEED = 0
WEIGHTS = "digits-cnn-v3.safetensors"  # v3: the default recipe of torchship train


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(width * 14 * 14, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, image):
        x = self.pool(torch.relu(self.bn(self.conv(image))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def student() -> nn.Module:
    """Half the width of digits-cnn: a distillation student."""
    return DigitsCNN(width=8, hidden=32)


def dataset() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fixed train/val/test split (70/10/20) of the 1,797 digits, as float32 [N,1,28,28] in [0,1] and int64 labels."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).numpy()
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    n_train, n_val = int(0.7 * len(y)), int(0.1 * len(y))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {k: (x[idx], y[idx]) for k, idx in parts.items()}
