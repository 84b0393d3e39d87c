"""A classifier's logits as answers in its own terms: class names (``id2label``) and softmax scores."""
from __future__ import annotations

import numpy as np

from .records import Labels


def answer(labels: Labels, outputs: dict, top_k: int = 1) -> dict[str, np.ndarray]:
    """``label`` (the class names, BYTES) and ``score`` (softmax) of each item's ``top_k`` best classes: shape (n,)
    for one, (n, k) for more."""
    logits = np.asarray(outputs[labels.output], dtype=np.float64)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    p = z / z.sum(-1, keepdims=True)
    k = max(1, min(int(top_k), p.shape[-1]))
    best = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    names = np.asarray(labels.names, dtype=object)
    label, score = names[best], np.take_along_axis(p, best, -1).astype(np.float32)
    return {"label": label[..., 0], "score": score[..., 0]} if k == 1 and top_k == 1 else {"label": label, "score": score}
