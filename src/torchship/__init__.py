"""torchship: take a trained PyTorch model to production."""
from .bundle import load as load_bundle
from .bundle import verify as verify_bundle
from .errors import BundleError, MissingExtra, SourceError, SpecError, TorchshipError, UsageError
from .optimize import OptimizeOptions, OptimizeResult, optimize
from .sources import Model, load_source
from .spec import IOSpec, TensorSpec
from .verify import Budget

__version__ = "0.1.0"

__all__ = [
    "Budget", "BundleError", "IOSpec", "MissingExtra", "Model", "OptimizeOptions", "OptimizeResult", "SourceError",
    "SpecError", "TensorSpec", "TorchshipError", "UsageError", "load_bundle", "load_source", "optimize", "verify_bundle",
]
