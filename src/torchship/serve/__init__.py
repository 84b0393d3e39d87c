"""Serving: the Open Inference Protocol (KServe v2) over HTTP with dynamic batching (``serve``), on Ray Serve
beyond one machine (``torchship.serve.ray``). The names below are imported when first used: the protocol's
constants need neither Starlette nor uvicorn (``torchship perf`` and ``--help`` start faster)."""
import importlib as _importlib

_WHERE = {"BatchConfig": "batcher", "ServeConfig": "app", "create_app": "http", "serve": "server"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
