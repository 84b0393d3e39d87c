"""Serving: the Open Inference Protocol (KServe v2) over HTTP with dynamic batching (``serve``), on Ray Serve
beyond one machine (``torchship.serve.ray``)."""
from .app import ServeConfig, create_app
from .batcher import BatchConfig
from .server import serve

__all__ = ["BatchConfig", "ServeConfig", "create_app", "serve"]
