"""Run the server: uvicorn on one port (or ``procs`` processes sharing it, see ``procs.py``); SIGTERM stops
readiness, drains, then exits."""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from .. import scratch
from ..errors import TorchshipError, UsageError
from .app import Found, ServeConfig, open_bundles
from .http import create_app
from .procs import Link, own_snapshots, shared_socket, supervise


class _Uvicorn(uvicorn.Server):
    """On the first SIGTERM/SIGINT: stop accepting connections, turn not-ready, finish what was accepted (every
    response now closes its connection), exit. The process exits within the drain timeout whatever happens: a
    watchdog ends it there if a batch or a worker hangs. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float, grpc_port: int | None = None, link=None):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._draining = False
        self.watchdog: threading.Timer | None = None
        self.grpc_port, self.grpc = grpc_port, None
        self.link = link  # to the supervisor, in one of several server processes (procs.Link)

    async def serve(self, sockets=None) -> None:
        """Every model loaded and warmed up before the port opens: a model that cannot load is one line (the error
        propagates to the CLI), not a lifespan traceback."""
        models = self.config.app.state.server
        try:
            await models.start()
            if self.link is not None:
                await self.link.joined(models)  # the repository changes made since the supervisor started
            if self.grpc_port is not None:
                from . import grpc
                self.grpc = await grpc.start(models, self.config.host, self.grpc_port, reuse_port=self.link is not None)
            await super().serve(sockets)
        finally:
            if self.grpc is not None:
                await self.grpc.stop(0)
            await models.stop()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.link is not None and not self.should_exit:
            self.link.ready()

    def handle_exit(self, sig, frame):
        if self._draining:
            _exit_now(f"signal {sig} again during the drain: exiting now")
        self._draining = True
        self.watchdog = threading.Timer(self.drain_timeout, _exit_now, (
            f"the drain did not finish within --drain-timeout {self.drain_timeout:g} s: exiting with requests "
            "unanswered",))
        self.watchdog.daemon = True
        self.watchdog.start()
        app_server = self.config.app.state.server
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(app_server)))

    async def _drain(self, app_server, quiet: float = 0.25) -> None:
        """Close the listening sockets (new connections are refused from now on; those already in their backlogs are
        served), then serve on, each response closing its connection, until the queues are empty and no request came
        for ``quiet`` seconds, or most of the drain timeout has passed; then uvicorn finishes what is in flight in the
        time left."""
        start = time.monotonic()
        self.close_listening()
        # only now do answers say Connection: close (and readiness turn false): a client told to close before the
        # listening socket was closed could connect again into its backlog, and be reset when it closed
        app_server.draining = True
        reserve = min(2.0, 0.25 * self.drain_timeout)  # for uvicorn's own shutdown and stopping the models
        if self.grpc is not None:  # refuses new calls at once, lets those in flight finish (the task held: a task
            # nobody references may be collected before it runs)
            self._grpc_stopping = asyncio.get_running_loop().create_task(self.grpc.stop(self.drain_timeout - reserve))
        while time.monotonic() < start + self.drain_timeout - reserve:
            if app_server.idle() and time.monotonic() - app_server.last_request > quiet:
                break
            await asyncio.sleep(0.02)
        self.config.timeout_graceful_shutdown = max(0.1, start + self.drain_timeout - time.monotonic() - 0.5 * reserve)
        self.should_exit = True

    def close_listening(self) -> int:
        """Close the listening sockets without resetting the connections in their backlogs: a client the kernel
        connected but the loop had not accepted yet (its request may be sent already) is taken and served, not
        reset by the close. The sockets are held open by a duplicate while asyncio's (or uvloop's) server closes
        its own, their backlogs accepted from the duplicate until empty, then closed: a connection that arrives in
        the microseconds between the last accept and the close is the only one still reset. Returns how many were
        taken from the backlogs."""
        loop, config = asyncio.get_running_loop(), self.config

        def protocol():  # as uvicorn.Server.startup makes them
            return config.http_protocol_class(config=config, server_state=self.server_state,
                                              app_state=self.lifespan.state)

        def _taken(task) -> None:
            self._taking.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved, not logged: a client gone before it was taken has nothing to answer

        taken, self._taking = 0, set()
        for listening in getattr(self, "servers", []):
            held = [socket.socket(fileno=os.dup(s.fileno())) for s in listening.sockets or ()]
            listening.close()
            for sock in held:
                sock.setblocking(False)
                try:
                    while True:
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        task = loop.create_task(loop.connect_accepted_socket(protocol, conn))
                        self._taking.add(task)  # held until done: a task nobody references may be collected
                        task.add_done_callback(_taken)
                        taken += 1
                except OSError:  # BlockingIOError: the backlog is empty
                    pass
                finally:
                    sock.close()
        return taken


class _OneWrite:
    """The transport as one response's cycle sees it: uvicorn writes a response's head, then its body, each with a
    write of its own (two system calls and, with TCP_NODELAY, two TCP segments an answer); this holds the head and
    sends it with the first write after it, or when the response completes or the connection closes."""
    __slots__ = ("transport", "head", "held")

    def __init__(self, transport):
        self.transport, self.head, self.held = transport, None, False

    def write(self, data: bytes) -> None:
        if self.head is not None:
            data, self.head = self.head + data, None
        elif not self.held and data[:9] == b"HTTP/1.1 " and data[9:12] != b"100":  # the head (not 100 Continue)
            self.head, self.held = data, True
            return
        self.transport.write(data)

    def flush(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class _Answered:
    """The cycle of a request answered from its headers: uvicorn drops the rest of its body (and sets the event when
    the connection goes; nothing waits on it)."""
    response_complete = True

    def __init__(self):
        self.message_event = asyncio.Event()


def shedding_protocol(server):
    """uvicorn's httptools protocol, answering the infer requests that ``server.admission`` refuses as soon as their
    headers are read: no ASGI request, task or body is made for them (under a flood, every refused request costs
    the event loop time whether it is served or not; this way costs less). Any other request, or one behind a
    pipelined request still in progress, takes uvicorn's own path."""
    import http
    import urllib.parse

    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from .http import _INFER

    answered = _Answered()
    wire: dict[tuple[int, bool], tuple[tuple, bytes]] = {}  # the bytes of reused answers, by (id, keep-alive)
    made_with: list = [None]  # the default headers (the date) those bytes carry

    class Shedding(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            if ((self.cycle is None or self.cycle.response_complete) and not self.parser.should_upgrade()
                    and self.parser.get_method() == b"POST"):
                path = httptools.parse_url(self.url).path.decode("latin-1")
                found = _INFER.fullmatch(urllib.parse.unquote(path) if "%" in path else path)
                refused = server.admission(found[1], found[2])[1] if found else None  # infer() checks again
                if refused is not None:
                    return self._answer(refused)
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not isinstance(cycle.transport, _OneWrite):
                one = cycle.transport = _OneWrite(cycle.transport)
                done = cycle.on_response
                cycle.on_response = lambda: (one.flush(), done())

        def _answer(self, refused: tuple[int, bytes, dict]) -> None:
            keep = (self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
                    and not server.draining)
            defaults = self.server_state.default_headers
            if defaults is not made_with[0]:  # uvicorn renews them every second
                wire.clear()
                made_with[0] = defaults
            made = wire.get((id(refused), keep))
            if made is None or made[0] is not refused:
                made = refused, _response(*refused, defaults, keep)
                if refused[0] == 503 and len(wire) < 256:  # the shed answers: a few objects reused (Server.error_answer)
                    wire[id(refused), keep] = made
            self.cycle = answered
            self.transport.write(made[1])
            if keep:
                self.on_response_complete()
            else:
                self.server_state.total_requests += 1
                self.transport.close()

        # The keep-alive timeout, without a timer made and cancelled on every request (uvicorn's way, which costs
        # more than the rest of a refusal's Python): one timer per connection, which looks at how long the
        # connection has been idle when it fires and waits on if it has not been idle long enough.
        _idle_since: float | None = None  # loop time of the last answer; None while a request is read or served

        def _unset_keepalive_if_required(self) -> None:
            self._idle_since = None

        def on_response_complete(self) -> None:
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self.flow.resume_reading()
            if self.pipeline:
                self._idle_since = None
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
                return
            self._idle_since = self.loop.time()
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

        def _idle_check(self) -> None:
            self.timeout_keep_alive_task = None
            if self._idle_since is None or self.transport.is_closing():  # busy: armed again at its answer
                return
            left = self._idle_since + self.timeout_keep_alive - self.loop.time()
            if left > 0:
                self.timeout_keep_alive_task = self.loop.call_later(left, self._idle_check)
            else:
                self.timeout_keep_alive_handler()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None

    def _response(status: int, body: bytes, headers: dict, defaults, keep: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
        lines += [name + b": " + value for name, value in defaults]
        lines += [f"{k}: {v}".encode() for k, v in headers.items()]
        lines += [b"content-length: %d" % len(body)] + ([] if keep else [b"connection: close"])
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    return Shedding


def _exit_now(why: str) -> None:
    sys.stderr.write(f"torchship serve: {why}\n")
    sys.stderr.flush()
    os._exit(1)


def serve(paths: list[Path], config: ServeConfig | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout: float = 30.0, log_level: str = "warning", on_verified=None, grpc_port: int | None = None,
          procs: int = 1) -> None:
    """Verify every bundle (a bad one is one line, before anything binds), then serve until SIGTERM, over HTTP on
    ``port`` and, with ``grpc_port``, over gRPC too; with ``procs`` > 1, from that many server processes sharing
    the ports (each with its own copy of every model and its own batcher). ``on_verified(found)`` is called with
    the (name, version, bundle) list once they are verified."""
    if procs < 1:
        raise UsageError(f"--procs must be at least 1, got {procs}")
    config = config or ServeConfig()
    into = scratch.make("serve")
    try:
        opened = open_bundles(paths, into, config)
        if on_verified is not None:
            on_verified(opened)
        if procs > 1:
            supervise(server_process, paths, config, opened, procs, host=host, port=port, grpc_port=grpc_port,
                      drain_timeout=drain_timeout, log_level=log_level)
        else:
            run(paths, config, opened, host=host, port=port, drain_timeout=drain_timeout, log_level=log_level,
                grpc_port=grpc_port)
    finally:
        scratch.remove(into)


def run(paths: list[Path], config: ServeConfig, opened: list[Found], *, host: str, port: int, drain_timeout: float,
        log_level: str, grpc_port: int | None, link=None) -> None:
    """One server process over verified bundles; with ``link``, one of several on the same ports."""
    app = create_app(paths, config, opened)
    ucfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout) or 1,
                          lifespan="on", access_log=False, http=shedding_protocol(app.state.server),
                          proxy_headers=False)  # nothing here reads the client's address: no X-Forwarded-For parsing
    server = _Uvicorn(ucfg, drain_timeout, grpc_port, link)
    try:
        server.run(sockets=[shared_socket(host, port)] if link is not None else None)
    finally:
        if server.watchdog is not None:
            server.watchdog.cancel()


def server_process(index: int, paths, config: ServeConfig, opened: list[Found], options: dict, asks, orders,
                   replay: list) -> None:
    """One of several server processes (``supervise`` starts it in a fresh interpreter)."""
    os.setpgrp()  # Ctrl-C reaches the supervisor alone, which passes it on once
    into = scratch.make(f"serve-{index}")
    try:
        run(paths, config, own_snapshots(opened, into), link=Link(index, asks, orders, replay), **options)
    except TorchshipError as exc:
        sys.stderr.write(f"torchship serve: server process {index}: {exc}\n")
        sys.exit(1)
    finally:
        scratch.remove(into)
