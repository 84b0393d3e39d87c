"""Errors raised by torchship: one tree, each message one line that says what to do.

TorchshipError                 base (CLI exit code 1)
 ├── UsageError                the user asked for something malformed (exit code 2)
 │    └── SpecError            an IOSpec string or a feed that does not fit the spec
 ├── SourceError               a model source that cannot be found or loaded
 ├── MissingExtra              an optional dependency is not installed (names the extra)
 ├── BuildSkipped              a runtime or transform cannot take this model (the plan goes on)
 ├── ModelError                the model itself raised, with the module that was running
 ├── TrainingDiverged          the loss became NaN or infinite
 ├── BundleError               a bundle that is missing, malformed, unsigned or fails its checksum (exit code 2)
 │    └── UntrustedCode        a bundle that would run code (Python or native), loaded without consent
 ├── UnsafeFile                a model file that reading would unpickle, or that points outside itself (exit code 2)
 ├── OutputError               an output directory that cannot be written
 └── ServeError                a request the server refuses; ``status`` is its HTTP status, ``reason`` its metric label
      ├── BadRequest           400: the request does not fit the protocol or the model
      │    ├── Disconnected    the client went away before its request was read
      │    └── LengthRequired  411: an infer request without Content-Length
      ├── NotFound             404: no such model or version
      ├── TooLarge             413: the body is over the limit
      ├── Unavailable          503 with Retry-After: come back later
      │    ├── QueueFull       the queue is at its request or byte limit
      │    │    └── WouldMissSLO  SLO mode: the work ahead would make this request miss the SLO
      │    ├── Busy            the server holds its limit of requests in flight
      │    └── ShuttingDown    the server is draining, or the model was unloaded
      ├── DeadlineExceeded     504: the deadline passed before the request ran, or the model never answered
      └── ModelFailed          500: the model itself failed on the batch
           └── WorkerDied      the worker process running the batch died

Errors from torch, ONNX, OpenVINO or the filesystem are translated at the boundary with ``raise ... from exc``;
``first_line`` gives the one line of a foreign exception.
"""
from __future__ import annotations

# the extras of pyproject.toml that an install hint may name (a test holds this to pyproject)
EXTRAS = ("all", "compress", "grpc", "nlp", "openvino", "optimize", "ray", "torch", "train")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (just ``Type`` when the message is empty), at most ``limit`` characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}" if line else type(exc).__name__


class TorchshipError(Exception):
    exit_code = 1


class UsageError(TorchshipError):
    exit_code = 2


class SpecError(UsageError):
    pass


class SourceError(TorchshipError):
    pass


class MissingExtra(TorchshipError):
    def __init__(self, package: str, extra: str):
        if extra not in EXTRAS:
            raise ValueError(f"MissingExtra names extra {extra!r}, which pyproject.toml does not define ({EXTRAS})")
        super().__init__(f"{package} is not installed; install it with: pip install 'torchship[{extra}]'")
        self.package, self.extra = package, extra


# the extra that installs each optional package torchship imports (the top-level module's name)
PACKAGE_EXTRAS = {"torch": "torch", "lightning": "torch", "onnxscript": "torch", "matplotlib": "torch",
                  "sklearn": "torch", "transformers": "nlp", "torchao": "compress", "torch_pruning": "compress",
                  "nncf": "compress", "openvino": "openvino", "ray": "ray", "grpc": "grpc", "tritonclient": "grpc"}


def missing_extra(exc: ModuleNotFoundError, needed_for: str) -> Exception:
    """An optional package not installed, as the one line naming the extra; anything else unchanged."""
    top = (exc.name or "").split(".")[0]
    if top not in PACKAGE_EXTRAS:
        return exc
    return MissingExtra(f"{top} (for {needed_for})", PACKAGE_EXTRAS[top])


class BuildSkipped(TorchshipError):
    pass


class ModelError(TorchshipError):
    pass


class TrainingDiverged(TorchshipError):
    pass


class BundleError(TorchshipError):
    exit_code = 2


class UntrustedCode(BundleError):
    pass


class UnsafeFile(TorchshipError):
    exit_code = 2


class OutputError(TorchshipError):
    pass


class ServeError(TorchshipError):
    status = 500
    reason = "error"
    headers: dict[str, str] = {}


class BadRequest(ServeError):
    status, reason = 400, "bad_request"


class Disconnected(BadRequest):
    reason = "disconnect"


class NotFound(ServeError):
    status, reason = 404, "not_found"


class LengthRequired(BadRequest):
    status, reason = 411, "length_required"


class TooLarge(ServeError):
    status, reason = 413, "too_large"


class Unavailable(ServeError):
    status, reason = 503, "unavailable"
    headers = {"Retry-After": "1"}


class QueueFull(Unavailable):
    reason = "queue_full"


class WouldMissSLO(QueueFull):
    reason = "slo"


class Busy(Unavailable):
    reason = "in_flight"


class ShuttingDown(Unavailable):
    reason = "shutting_down"


class DeadlineExceeded(ServeError):
    status, reason = 504, "deadline"


class ModelFailed(ServeError):
    status, reason = 500, "model_error"


class WorkerDied(ModelFailed):
    reason = "worker_died"
