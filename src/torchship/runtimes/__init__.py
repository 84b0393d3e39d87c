"""One module per way of running a model, behind the protocol in ``base``."""
from .base import Artifact, Runner, Runtime, get, names

_MODULES = ("eager", "torchscript", "compile", "aoti", "onnxrt")


def _load_all() -> None:
    import importlib
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


__all__ = ["Artifact", "Runner", "Runtime", "get", "names"]
