"""torchship serve --ray: the same Open Inference Protocol app, as a Ray Serve deployment with replicas.

Each replica runs the app that ``torchship serve`` runs (same routes, batcher, bounded queue, deadlines and error
messages), built on the replica from the bundle paths; Ray's HTTP proxy spreads requests over the replicas and
Ray Serve's autoscaler adds and removes them. Bundle paths must exist on every node that hosts a replica.
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import MissingExtra, UsageError
from ..machine import cores
from .app import ServeConfig
from .http import create_app

APP_NAME = "torchship"


@dataclass(frozen=True)
class RayConfig:
    replicas: int = 1
    max_replicas: int | None = None  # autoscaling from `replicas` up to this many
    target_ongoing_requests: float = 32.0  # autoscaling target per replica (a replica batches what it holds)
    address: str | None = None  # an existing cluster ("auto" or ray://...); default: a local one
    cpus_per_replica: float | None = None  # default: this machine's cores / the most replicas

    def __post_init__(self):
        if self.replicas < 1 or (self.max_replicas is not None and self.max_replicas < self.replicas):
            raise UsageError(f"--replicas must be at least 1 and --max-replicas at least --replicas, got "
                             f"{self.replicas} and {self.max_replicas}")


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MissingExtra("ray[serve] (for serve --ray)", "ray") from exc
    return ray, serve


def build_app(paths: list[str], config: ServeConfig):
    """Runs on each replica: the same ASGI app as the local server."""
    return create_app([Path(p) for p in paths], config)


def application(paths: list[Path], config: ServeConfig | None = None, ray_config: RayConfig | None = None,
                drain_timeout: float = 30.0):
    """A bound Ray Serve application serving ``paths``; pass it to ``ray.serve.run``."""
    _, serve = _ray()
    config, rc = config or ServeConfig(), ray_config or RayConfig()
    if config.admin_token or config.repository:
        raise UsageError("the load/unload API is per process; under --ray, roll out a new version by deploying again "
                         "(Ray Serve replaces replicas one by one)")
    most = rc.max_replicas or rc.replicas
    cpus = rc.cpus_per_replica or max(1.0, cores() // most)
    config = replace(config, threads=config.threads or int(cpus), workers=1)
    # Ray holds back requests past a replica's max_ongoing_requests in its own queue; set it past what the replica's
    # batcher holds, so overflow reaches the batcher and gets the local server's 503, and bound Ray's queue too
    held = config.batch.max_queue_requests + (config.max_batch_size or config.batch.max_batch_size)
    ongoing = 2 * held + 16
    scaling = ({"min_replicas": rc.replicas, "max_replicas": rc.max_replicas,
                "target_ongoing_requests": rc.target_ongoing_requests} if rc.max_replicas else None)
    deployment = serve.deployment(
        serve.ingress(lambda: build_app([str(Path(p).resolve()) for p in paths], config))(),
        name="torchship", num_replicas=None if scaling else rc.replicas, autoscaling_config=scaling,
        max_ongoing_requests=ongoing, max_queued_requests=held, ray_actor_options={"num_cpus": cpus}, graceful_shutdown_timeout_s=drain_timeout)
    return deployment.bind()


def serve_ray(paths: list[Path], config: ServeConfig | None = None, ray_config: RayConfig | None = None, *,
              host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0, block: bool = True) -> None:
    """Start (or join) a Ray cluster, deploy, and serve until SIGTERM/SIGINT; then drain and shut Serve down."""
    ray, serve = _ray()
    rc = ray_config or RayConfig()
    app = application(paths, config, rc, drain_timeout)
    ray.init(address=rc.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    if not block:
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)  # replicas finish what they hold (graceful_shutdown_timeout_s) before they go
    serve.shutdown()
    ray.shutdown()
