"""torchship: take a trained PyTorch model to production."""
import logging as _logging

# import-time notices from torchao (imported by transformers where installed) about kernels for other machines
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from .bundle import load as load_bundle
from .bundle import verify as verify_bundle
from .errors import BundleError, MissingExtra, SourceError, SpecError, TorchshipError, UsageError
from . import inspect  # the subpackage: torchship.inspect.watch(model), torchship.inspect.inspect(source)
from .inspect import watch
from .inspect.check import Finding, check
from .optimize import OptimizeOptions, OptimizeResult, optimize
from .perf import perf
from .serve.app import ServeConfig, create_app
from .serve.batcher import BatchConfig
from .serve.server import serve
from .sources import Model, load_source
from .spec import IOSpec, TensorSpec
from .verify import Budget

__version__ = "0.1.0"

__all__ = [
    "BatchConfig", "Budget", "BundleError", "Finding", "IOSpec", "MissingExtra", "Model", "OptimizeOptions",
    "OptimizeResult", "ServeConfig", "SourceError", "SpecError", "TensorSpec", "TorchshipError", "UsageError", "check",
    "create_app", "inspect", "load_bundle", "load_source", "optimize", "perf", "serve", "verify_bundle", "watch",
]
