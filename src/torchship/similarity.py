"""How alike two sets of outputs are, item by item: cosine, and for embeddings what they are used for (nearest
neighbours kept). Plain numpy: verification and the builds that hold a budget as they go both read it."""
from __future__ import annotations

import numpy as np


RETRIEVAL_K = 10  # neighbours per item


def retrieval(ref: np.ndarray, out: np.ndarray, k: int = RETRIEVAL_K) -> tuple[float, float] | None:
    """What an embedding is used for, against the reference on the same items: (the mean share of each item's k
    nearest neighbours by cosine that are still among its k nearest, the Spearman correlation of all pairwise
    cosines). None for fewer than 3 items or outputs that are not one vector an item."""
    if ref.ndim != 2 or len(ref) < 3:
        return None
    k = min(k, len(ref) - 1)

    def sims(x):
        x = x.astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        return x @ x.T
    a, b = sims(ref), sims(out)
    np.fill_diagonal(a, -np.inf)
    np.fill_diagonal(b, -np.inf)
    na, nb = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    kept = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb)]))
    from scipy.stats import spearmanr  # scikit-learn's dependency: optimize's extras have it
    iu = np.triu_indices(len(ref), 1)
    rho = float(spearmanr(a[iu], b[iu]).statistic)
    return kept, rho if np.isfinite(rho) else 1.0  # constant similarities: nothing to rank, nothing lost


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


EXTRA_TOLERANCE = 0.02  # on inputs beyond the verification items a variant may be off by this much (relative L2) ...
EXTRA_FACTOR = 3.0  # ... or by this many times its own error on the verification inputs, whichever is larger


def extra_cosine(main_error: float) -> float:
    """The cosine per item that the rule for inputs beyond the verification items allows (a relative error of
    ``EXTRA_FACTOR`` times ``main_error``, or ``EXTRA_TOLERANCE``): 1 - e^2/2, exact for vectors of one length."""
    return max(0.0, 1 - max(EXTRA_TOLERANCE, EXTRA_FACTOR * main_error) ** 2 / 2)
