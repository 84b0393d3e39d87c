"""torchship: take a trained PyTorch model to production.

Most names below are imported when first used; none of them imports torch until it runs a model, so that a serving
process whose bundle needs no torch never imports it.
"""
import importlib as _importlib
import logging as _logging

# import-time notices from torchao (imported by transformers where installed) about kernels for other machines
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

__version__ = "0.1.0"

_WHERE = {
    "BatchConfig": "serve.batcher", "Budget": "verify", "BundleError": "errors", "Finding": "inspect.check",
    "IOSpec": "spec", "MissingExtra": "errors", "Model": "sources", "OptimizeOptions": "optimize",
    "OptimizeResult": "optimize", "ServeConfig": "serve.app", "SourceError": "errors", "SpecError": "errors",
    "TensorSpec": "spec", "TorchshipError": "errors", "UsageError": "errors", "check": "inspect.check",
    "create_app": "serve.http", "inspect": None, "load_bundle": ("bundle", "load"), "load_source": "sources",
    "optimize": "optimize", "perf": "perf", "serve": None, "verify_bundle": ("bundle", "verify"),
    "watch": "hooks",
}
__all__ = sorted(_WHERE)


# functions named like the module that holds them: bound now, so that importing that module later never hides them
from .optimize import optimize  # noqa: E402
from .perf import perf  # noqa: E402


def __getattr__(name: str):
    where = _WHERE.get(name, False)
    if where is False:
        raise AttributeError(f"module 'torchship' has no attribute {name!r}")
    if where is None:  # a subpackage
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        module, attr = where if isinstance(where, tuple) else (where, name)
        value = getattr(_importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
