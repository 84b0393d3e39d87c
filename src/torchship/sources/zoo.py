"""``zoo:NAME``: torchship's built-in models as sources, with their held-out and calibration data."""
from __future__ import annotations

from typing import Mapping

from ..arch import Architecture
from ..spec import IOSpec
from ..zoo import unknown


def load_zoo(name: str, dims: Mapping[str, int] | None = None):
    if name == "digits-cnn":
        return _digits()
    if name == "minilm":
        return _minilm(int((dims or {}).get("seq", 128)))
    raise unknown(name)


def _digits():
    from ..train.pretrained import digits_cnn
    from ..zoo.digits import SPEC, dataset
    from .model import Model, infer_outputs
    module = digits_cnn()
    data = dataset()
    x, y = data["test"]
    spec = IOSpec(SPEC.inputs, infer_outputs(module, SPEC, {}, ["logits"]))
    return Model("digits-cnn", module, spec, task="classify", arch=Architecture("zoo", tuple(SPEC.input_names), "digits-cnn"),
                 eval_data={"image": x}, labels=y, calibration_data={"image": data["val"][0]})


def _minilm(seq: int, n_eval: int = 64, n_calibration: int = 64):
    from dataclasses import replace

    from ..zoo.minilm import model_dir, sentences
    from .hf import load_hf_dir, tokenize
    text = sentences(n_eval + n_calibration)
    model = load_hf_dir(model_dir(), {"seq": seq}, pooling="mean", name="minilm", sentences=text[:n_eval])
    # static int8 calibrates on sentences that verification does not use
    return replace(model, calibration_data=tokenize(model.tokenizer, text[n_eval:], seq))
