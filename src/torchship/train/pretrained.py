"""The zoo's trained weights: digits-cnn is trained here on first use with torchship's own recipe, then cached."""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

log = logging.getLogger("torchship")


def digits_cnn() -> nn.Module:
    """The trained digits-cnn, normalized (``image`` in, ``(logits,)`` out), in eval mode."""
    from safetensors.torch import load_file, save_file

    from ..arch import Architecture
    from ..modules import rebuild
    from ..zoo import cache_dir
    from ..zoo.digits import SPEC, WEIGHTS, dataset
    from .fit import TrainConfig, fit
    path = cache_dir() / WEIGHTS
    config = TrainConfig(progress=False)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights: every machine trains the same model (up to its
        torch.manual_seed(config.seed)        # kernels), and the caller's random state is left as it was
        model = rebuild(Architecture("zoo", tuple(SPEC.input_names), "digits-cnn"))
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    started = time.perf_counter()
    result = fit(model, dataset(), config)
    acc = result.summary["test"]["test_acc"]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(result.model.state_dict(), str(tmp), metadata={"test_accuracy": f"{acc:.4f}"})
    try:  # the first process to finish wins: two that trained at once use the same weights after
        os.link(tmp, path)
        log.info("trained digits-cnn in %.1fs: test accuracy %.1f%% (cached at %s)", time.perf_counter() - started,
                 100 * acc, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: the last to finish wins instead
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
