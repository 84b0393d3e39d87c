"""Errors raised by torchship.

TorchshipError                 base; its message is one line that says what to do
 ├── UsageError                the user asked for something malformed (CLI exit code 2)
 │    └── SpecError            an IOSpec string or a feed that does not fit the spec
 ├── SourceError               a model source that cannot be found or loaded
 ├── MissingExtra              an optional dependency is not installed
 ├── BuildSkipped              a runtime or transform cannot take this model (the plan goes on)
 ├── BundleError               a bundle that is missing, malformed or fails its checksum
 └── OutputError               an output directory that cannot be written

Errors from torch, ONNX or the filesystem are translated at the boundary with
``raise ... from exc``.
"""
from __future__ import annotations


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
        super().__init__(f"{package} is not installed; install it with: pip install 'torchship[{extra}]'")
        self.package, self.extra = package, extra


class BuildSkipped(TorchshipError):
    pass


class BundleError(TorchshipError):
    pass


class OutputError(TorchshipError):
    pass
