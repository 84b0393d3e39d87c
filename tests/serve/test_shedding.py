"""The header-time refusal protocol (serve/server.py) driven directly: a fake transport and a fake clock, so that
what it writes and when it closes an idle connection are decided by the test, not by timing."""
from __future__ import annotations

import asyncio
import shutil

import pytest
import uvicorn
from uvicorn.server import ServerState

from torchship.errors import NotFound, QueueFull
from torchship.serve.app import ServeConfig, Server, problem
from torchship.serve.server import shedding_protocol


class Clock:
    """The loop, as far as the protocol uses it: time() and call_later(), run by hand."""

    def __init__(self):
        self.now, self.timers = 0.0, []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback):
        timer = Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list["Timer"]:
        return [t for t in self.timers if not t.cancelled and not t.fired]

    def advance(self, to: float) -> None:
        """Move the clock to ``to``, firing the timers due by then in order."""
        while True:
            due = sorted((t for t in self.pending() if t.when <= to), key=lambda t: t.when)
            if not due:
                break
            self.now = due[0].when
            due[0].fired = True
            due[0].callback()
        self.now = to


class Timer:
    def __init__(self, when: float, callback):
        self.when, self.callback, self.cancelled, self.fired = when, callback, False, False

    def cancel(self) -> None:
        self.cancelled = True


class Transport:
    def __init__(self):
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Models:
    """What the protocol asks of the server: ``admission`` and ``draining``. Model "full" is refused with one 503 answer
    object reused (as Server.error_answer does); any other name is unknown, its 404 naming it."""
    draining = False
    full = problem(503, "queue full: --max-queue 16 reached", {"Retry-After": "1"})

    def admission(self, name: str, version):
        if name == "ok":  # admitted: the request goes on to the ASGI app
            return object(), None
        return None, self.full if name == "full" else problem(404, f"unknown model {name!r}")


def connection(clock: Clock, timeout_keep_alive: float = 5.0):
    config = uvicorn.Config(app=None, http=shedding_protocol(Models()), timeout_keep_alive=timeout_keep_alive,
                            access_log=False)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Tue, 01 Dec 2026 10:00:00 GMT")]
    proto = config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=clock)
    transport = Transport()
    proto.connection_made(transport)
    return proto, transport, state


def post(model: str, body: bytes = b"\0" * 16) -> bytes:
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: 2\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout_and_one_mid_request_is_not():
    clock = Clock()
    proto, transport, _ = connection(clock)
    proto.data_received(post("nope"))
    assert transport.written[-1].startswith(b"HTTP/1.1 404 ") and len(clock.pending()) == 1
    clock.advance(3.0)
    proto.data_received(post("nope"))  # answered at 3 s: still one timer (not one per request), now idle from 3 s
    assert len(transport.written) == 2 and len(clock.pending()) == 1 and len(clock.timers) == 1  # none made again
    clock.advance(7.9)  # the timer fired at 5 s, saw 2 s of idleness, and waits on to 8 s
    assert not transport.closed and [t.when for t in clock.pending()] == [8.0]
    proto.data_received(post("nope")[:20])  # a request starts arriving before 8 s and stalls
    clock.advance(30.0)
    assert not transport.closed and not clock.pending()  # mid-request: not a keep-alive timeout
    proto.data_received(post("nope")[20:])  # answered at 30 s: idle again, closed 5 s later
    assert transport.written[-1].startswith(b"HTTP/1.1 404 ")
    clock.advance(34.9)
    assert not transport.closed
    clock.advance(35.0)
    assert transport.closed


def test_a_closed_connection_leaves_no_timer_behind():
    clock = Clock()
    proto, transport, _ = connection(clock)
    proto.data_received(post("nope"))
    proto.connection_lost(None)
    assert not clock.pending()


def test_shed_answers_reuse_their_bytes_until_the_date_changes_and_others_name_their_model():
    clock = Clock()
    proto, transport, state = connection(clock)
    for model in ("full", "full", "nope", "other", "full"):
        proto.data_received(post(model))
    full, again, nope, other, third = transport.written
    assert full.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"\r\nretry-after: 1\r\n" in full.lower()
    assert b"date: Tue, 01 Dec 2026 10:00:00 GMT" in full and full.endswith(b'{"error":"queue full: --max-queue 16 reached"}')
    assert full is again is third  # the same bytes object: made once
    assert b"unknown model 'nope'" in nope and b"unknown model 'other'" in other
    state.default_headers = [(b"date", b"Tue, 01 Dec 2026 10:00:01 GMT")]  # uvicorn's tick, every second
    proto.data_received(post("full"))
    assert b"date: Tue, 01 Dec 2026 10:00:01 GMT" in transport.written[-1]
    proto.data_received(post("full").replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n"))
    assert b"connection: close" in transport.written[-1] and transport.closed


def test_the_server_makes_each_shed_answer_once_and_counts_every_refusal():
    server = Server([], ServeConfig())
    shutil.rmtree(server.snapshots)  # made by the constructor; nothing is loaded here
    first = server.error_answer(None, QueueFull("queue full: --max-queue 16 reached"), reuse=True)
    second = server.error_answer(None, QueueFull("queue full: --max-queue 16 reached"), reuse=True)
    assert first is second and first[0] == 503 and first[2]["Retry-After"] == "1"
    a, b = (server.error_answer(None, NotFound(f"unknown model {n!r}")) for n in ("a", "b"))
    assert b"'a'" in a[1] and b"'b'" in b[1]
    text = server.metrics.exposition().decode()
    assert 'torchship_request_failure_total{model="",reason="queue_full",version=""} 2.0' in text
    assert 'torchship_rejected_total{model="",reason="queue_full",version=""} 2.0' in text


async def _app(scope, receive, send):
    """An ASGI app answering every request the way torchship's infer path does: a head, then the whole body."""
    if scope["type"] != "http":
        return
    message = await receive()  # reads the body (and so answers Expect: 100-continue)
    body = b"answer to " + message.get("body", b"")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def test_a_served_response_leaves_in_one_write_and_100_continue_and_head_still_work():
    async def run():
        config = uvicorn.Config(app=_app, http=shedding_protocol(Models()), access_log=False, proxy_headers=False)
        config.load()
        proto = config.http_protocol_class(config=config, server_state=ServerState(), app_state={},
                                           _loop=asyncio.get_running_loop())
        transport = Transport()
        proto.connection_made(transport)

        async def answered(request: bytes) -> list[bytes]:
            start = len(transport.written)
            proto.data_received(request)
            for _ in range(100):
                await asyncio.sleep(0)
                if proto.cycle.response_complete:
                    break
            return transport.written[start:]
        body = b"\0" * 16
        one = await answered(post("ok", body))
        assert len(one) == 1 and one[0].startswith(b"HTTP/1.1 200 OK\r\n") and one[0].endswith(b"answer to " + body)
        expect = post("ok", body).replace(b"Host: t\r\n", b"Host: t\r\nExpect: 100-continue\r\n")
        head_end = expect.index(b"\r\n\r\n") + 4
        proto.data_received(expect[:head_end])  # the client waits for 100 Continue before it sends the body
        for _ in range(100):
            await asyncio.sleep(0)
            if transport.written[-1] == b"HTTP/1.1 100 Continue\r\n\r\n":
                break
        assert transport.written[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
        rest = await answered(expect[head_end:])
        assert len(rest) == 1 and rest[0].startswith(b"HTTP/1.1 200 OK\r\n")
        head = await answered(b"HEAD /v2 HTTP/1.1\r\nHost: t\r\n\r\n")  # a head and no body: sent at completion
        assert len(head) == 1 and head[0].startswith(b"HTTP/1.1 200 OK\r\n") and head[0].endswith(b"\r\n\r\n")
        proto.connection_lost(None)
    asyncio.run(run())


async def _hello(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _backlog_drain(loop_factory) -> tuple[int, list[bytes], type | None]:
    """A real uvicorn server on 127.0.0.1; eight clients connect and send a request while the loop is not running
    (the kernel completes their handshakes into the listening socket's backlog, nothing accepts them), then the
    drain closes the listening socket. What each client reads back, and what a new connection meets after."""
    import socket

    from torchship.serve.server import _Uvicorn

    async def main():
        config = uvicorn.Config(_hello, lifespan="off", access_log=False, log_level="warning",
                                http=shedding_protocol(Models()))
        config.load()
        server = _Uvicorn(config, drain_timeout=5.0)
        server.lifespan = config.lifespan_class(config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await server.startup(sockets=[sock])
        address = sock.getsockname()
        clients = []
        for _ in range(8):  # no await in between: the loop accepts none of them
            c = socket.create_connection(address, timeout=5)
            c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            clients.append(c)
        taken = server.close_listening()

        def read(c) -> bytes:
            got = b""
            try:
                while not got.endswith(b"ok"):
                    part = c.recv(4096)
                    if not part:
                        break
                    got += part
            except OSError as exc:
                got += f"<{type(exc).__name__}>".encode()
            return got

        answers = await asyncio.to_thread(lambda: [read(c) for c in clients])
        refused = None
        try:
            socket.create_connection(address, timeout=5).close()
        except OSError as exc:
            refused = type(exc)
        for c in clients:
            c.close()
        server.should_exit = True
        await server.shutdown()
        return taken, answers, refused

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def _uvloop():
    import uvloop
    return uvloop.new_event_loop()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, _uvloop], ids=["asyncio", "uvloop"])
def test_the_drain_serves_the_connections_in_the_listening_backlog_instead_of_resetting_them(loop_factory):
    taken, answers, refused = _backlog_drain(loop_factory)
    assert taken == 8
    assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"ok") for a in answers), answers
    assert refused is ConnectionRefusedError  # and the port takes no new connection


def test_past_the_in_flight_limit_any_model_is_refused_and_slo_mode_lowers_the_limit():
    """The server's limit on infer requests not yet answered (being read, queued or running), across models: the
    --max-queue of each, plus 64; in SLO mode a few batches' worth. Counted from the entries (set here), no clock."""
    from types import SimpleNamespace

    from torchship.errors import Busy
    from torchship.serve.batcher import BatchConfig

    def entry(name, running, queued=0):
        batcher = SimpleNamespace(depth=queued, in_flight=running, config=BatchConfig(max_queue_requests=8))
        return SimpleNamespace(name=name, version="1", why=None, reading=0, batcher=batcher)
    server = Server([], ServeConfig(batch=BatchConfig(max_queue_requests=8)))
    shutil.rmtree(server.snapshots)
    assert server.max_in_flight == 8 + 64
    busy, idle = entry("busy", running=70, queued=1), entry("idle", running=0)
    server.models = {"busy": {"1": busy}, "idle": {"1": idle}}
    assert server.cannot_take(idle) is None  # 71 of 72
    busy.reading = 1
    refused = server.cannot_take(idle)  # 72 of 72: the idle model is refused too, before its body is read
    assert isinstance(refused, Busy) and "the limit of 72 requests in flight is reached" in str(refused)
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    slo = Server([], ServeConfig(batch=BatchConfig(max_queue_requests=1024, slo_s=0.05), max_batch_size=4))
    shutil.rmtree(slo.snapshots)
    assert slo.max_in_flight == 4 * 4 + 64
