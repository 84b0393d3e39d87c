"""One module per way of running a model, behind the protocol in ``base`` (imported only when asked for)."""
from .base import Artifact, LoadContext, Runner, Runtime, get

__all__ = ["Artifact", "LoadContext", "Runner", "Runtime", "get"]
