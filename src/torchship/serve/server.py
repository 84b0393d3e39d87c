"""Run the server: uvicorn on one port; SIGTERM stops readiness, drains, then exits."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import uvicorn

from .app import ServeConfig, create_app, open_bundles


class _Uvicorn(uvicorn.Server):
    """On the first SIGTERM/SIGINT: not ready, wait for the queues to empty (up to the drain timeout), exit."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._draining = False

    async def serve(self, sockets=None) -> None:
        """Every model loaded and warmed up before the port opens: a model that cannot load is one line (the error
        propagates to the CLI), not a lifespan traceback."""
        models = self.config.app.state.server
        try:
            await models.start()
            await super().serve(sockets)
        finally:
            await models.stop()

    def handle_exit(self, sig, frame):
        if self._draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self._draining = True
        app_server = self.config.app.state.server
        app_server.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(app_server)))

    async def _drain(self, app_server, quiet: float = 0.25) -> None:
        """Serve on (not ready, closing connections after each response) until the queues are empty and no
        request came for ``quiet`` seconds, or the drain timeout passes; then uvicorn finishes what is in flight."""
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            if app_server.idle() and time.monotonic() - app_server.last_request > quiet:
                break
            await asyncio.sleep(0.02)
        self.should_exit = True


def serve(paths: list[Path], config: ServeConfig | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout: float = 30.0, log_level: str = "warning", on_verified=None) -> None:
    """Verify every bundle (a bad one is one line, before anything binds), then serve until SIGTERM.
    ``on_verified(found)`` is called with the (name, version, bundle) list once they are verified."""
    import shutil
    import tempfile
    config = config or ServeConfig()
    into = Path(tempfile.mkdtemp(prefix="torchship-serve-"))
    try:
        opened = open_bundles(paths, into, config)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    if on_verified is not None:
        on_verified(opened)
    app = create_app(paths, config, opened)
    ucfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout) or 1,
                          lifespan="on", access_log=False)
    server = _Uvicorn(ucfg, drain_timeout)
    try:
        server.run()
    finally:
        shutil.rmtree(into, ignore_errors=True)


