"""Several server processes on one port (``serve --procs N``).

When handling a request over HTTP or gRPC costs more than the model (digits-cnn runs in 2 us an item), one Python
process's event loop is the bottleneck, whatever the cores. With ``--procs N``, N whole servers (each its own event
loop, copy of every model and batcher) listen on the same ports with SO_REUSEPORT, and the kernel spreads the
connections over them. This process, the supervisor, verified the bundles once; each server process starts from
those verified snapshots (hard links of them), and the supervisor holds the ports (bound, never listening) so that
nothing else takes them while a server process restarts.

- Metrics: prometheus-client's multiprocess mode; /metrics, from whichever process answers, sums them all.
- The repository API: the process a load or unload request reaches asks the supervisor, which makes the change in
  every server process, one after another, and answers with the first error if any; a process that starts later
  replays the changes before it listens.
- Drain: SIGTERM or SIGINT to the supervisor goes to every server process, each drains as a single server does, a
  second signal ends them at once; the supervisor exits once they all have (non-zero if one did).
- A server process that dies is restarted; one that fails to start ends the server with its error.
"""
from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path

import orjson

from .. import errors, scratch
from ..errors import ServeError, TorchshipError, UsageError
from .app import Found, ServeConfig

RESTARTS = 5  # more deaths than this within RESTART_WINDOW_S end the server
RESTART_WINDOW_S = 60.0
CHANGE_TIMEOUT_S = 600.0  # a reload loads and warms up a model in every process


async def change(server, op: str, name: str) -> dict:
    """A repository change in this process, as the message the supervisor passes on."""
    try:
        if op == "load":
            versions, gone = await server.reload_here(name)
            return {"done": {"versions": versions, "unloaded": gone}}
        await server.unload_here(name)
        return {"done": {}}
    except ServeError as exc:
        return {"error": [type(exc).__name__, str(exc)]}
    except Exception as exc:  # a 500 that says what happened, never a supervisor left waiting
        return {"error": ["ServeError", f"the change failed: {type(exc).__name__}: {exc}"]}


def _error(kind_message: list) -> ServeError:
    kind, message = kind_message
    cls = getattr(errors, kind, None)
    return (cls if isinstance(cls, type) and issubclass(cls, ServeError) else ServeError)(message)


class Link:
    """A server process's end of its two pipes to the supervisor: ``asks`` carries its own messages (listening, a
    repository change a client asked of it), ``orders`` the changes the supervisor makes in every process, run on
    the event loop from a thread of its own. Messages are JSON."""

    def __init__(self, index: int, asks: Connection, orders: Connection, replay: list):
        self.index, self.asks, self.orders, self.replay = index, asks, orders, replay
        self._lock = threading.Lock()
        self.server = self.loop = None

    async def joined(self, server) -> None:
        """Before the port opens: the changes made since the supervisor started; then take orders."""
        for op, name in self.replay:
            await change(server, op, name)
        self.server, self.loop = server, asyncio.get_running_loop()
        server.broadcast = self.broadcast
        threading.Thread(target=self._take_orders, daemon=True, name="torchship-supervisor").start()

    def ready(self) -> None:
        with self._lock:
            self.asks.send_bytes(b'{"ready":true}')

    async def broadcast(self, op: str, name: str) -> dict:
        answer = await self.loop.run_in_executor(None, self._ask, {"op": op, "name": name})
        if "error" in answer:
            raise _error(answer["error"])
        return answer["done"]

    def _ask(self, message: dict) -> dict:
        with self._lock:
            self.asks.send_bytes(orjson.dumps(message))
            return orjson.loads(self.asks.recv_bytes())

    def _take_orders(self) -> None:
        while True:
            try:
                order = orjson.loads(self.orders.recv_bytes())
            except (EOFError, OSError):  # the supervisor is gone: drain and exit
                os.kill(os.getpid(), signal.SIGTERM)
                return
            done = asyncio.run_coroutine_threadsafe(change(self.server, order["op"], order["name"]), self.loop)
            self.orders.send_bytes(orjson.dumps(done.result()))


def shared_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (not listening yet): the kernel spreads the connections
    over every process listening on the port this way. A port another program holds is a usage error."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot bind {host}:{port} ({exc.strerror}): another program holds it; choose another port") from None
    return sock


def own_snapshots(opened: list[Found], into: Path) -> list[Found]:
    return [(n, v, _linked(b, into / f"{n}-{v}")) for n, v, b in opened]


def _linked(b, into: Path):
    """The supervisor's verified snapshot as this process's own: hard links (no copy; unloading it here removes
    these links, not the others' files)."""
    try:
        shutil.copytree(b.path, into, copy_function=os.link)
    except OSError:  # another file system
        shutil.rmtree(into, ignore_errors=True)
        shutil.copytree(b.path, into)
    return dataclasses.replace(b, path=into)


@dataclasses.dataclass
class _Process:
    index: int
    process: multiprocessing.process.BaseProcess
    asks: Connection
    orders: Connection
    applied: int  # changes it was started with
    ready: bool = False


class _Supervisor:
    def __init__(self, target, paths, config: ServeConfig, opened: list[Found], options: dict, metrics_dir: str):
        self.target, self.paths, self.config, self.opened, self.options = target, paths, config, opened, options
        self.metrics_dir = metrics_dir
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or loaded models copied
        self.changes: list[tuple[str, str]] = []
        self.running: list[_Process] = []
        self.deaths: list[float] = []

    def start(self, index: int) -> None:
        asks, their_asks = self.ctx.Pipe()
        orders, their_orders = self.ctx.Pipe()
        p = self.ctx.Process(target=self.target, name=f"torchship-serve-{index}", args=(
            index, self.paths, self.config, self.opened, self.options, their_asks, their_orders, list(self.changes)))
        p.start()
        their_asks.close()
        their_orders.close()
        self.running.append(_Process(index, p, asks, orders, len(self.changes)))

    def order(self, p: _Process, op: str, name: str) -> dict:
        try:
            p.orders.send_bytes(orjson.dumps({"op": op, "name": name}))
            if p.orders.poll(CHANGE_TIMEOUT_S):
                return orjson.loads(p.orders.recv_bytes())
            why = f"did not finish within {CHANGE_TIMEOUT_S:g} s"
        except (EOFError, OSError):
            why = "exited during the change"
        return {"error": ["Unavailable", f"server process {p.index} {why}"]}

    def asked(self, p: _Process, draining: bool) -> None:
        try:
            message = orjson.loads(p.asks.recv_bytes())
        except (EOFError, OSError):  # it is exiting: its sentinel says so next
            return
        if message.get("ready"):
            for op, name in self.changes[p.applied:]:  # made while it started
                self.order(p, op, name)
            p.ready = True
            return
        if draining:
            answer = {"error": ["ShuttingDown", "the server is shutting down"]}
        else:
            op, name = message["op"], message["name"]
            self.changes.append((op, name))
            answers = [self.order(q, op, name) for q in self.running if q.ready]
            failed = [a for a in answers if "error" in a]
            answer = failed[0] if failed else answers[0]
            if failed and len(failed) < len(answers):
                answer["error"][1] += (f" (in {len(failed)} of {len(answers)} server processes; the others made "
                                       "the change)")
        try:
            p.asks.send_bytes(orjson.dumps(answer))
        except OSError:  # it died waiting: its sentinel says so next
            pass

    def exited(self, p: _Process, draining: bool) -> str | None:
        """A server process ended: restart it, or say why the server must end."""
        from prometheus_client import multiprocess
        p.process.join()
        self.running.remove(p)
        multiprocess.mark_process_dead(p.process.pid, self.metrics_dir)
        code = p.process.exitcode
        if draining:
            return None if code == 0 else f"server process {p.index} exited with code {code} during the drain"
        if not p.ready:
            return f"server process {p.index} exited with code {code} before it was ready"
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if t > now - RESTART_WINDOW_S] + [now]
        if len(self.deaths) > RESTARTS:
            return f"server processes died {len(self.deaths)} times within {RESTART_WINDOW_S:g} s"
        sys.stderr.write(f"torchship serve: server process {p.index} exited with code {code}; starting it again\n")
        self.start(p.index)
        return None


def supervise(target, paths, config: ServeConfig, opened: list[Found], procs: int, *, host: str, port: int,
              grpc_port: int | None, drain_timeout: float, log_level: str) -> None:
    """Serve from ``procs`` server processes, each running ``target(index, paths, config, opened, options, asks,
    orders, replay)`` (importable: a fresh interpreter runs it), until SIGTERM or SIGINT; see the module's text."""
    held = [shared_socket(host, port)]  # the ports, held (and with port 0 chosen) for every server process
    port = held[0].getsockname()[1]
    if grpc_port is not None:
        held.append(shared_socket(host, grpc_port))
        grpc_port = held[1].getsockname()[1]
    config = dataclasses.replace(config, procs=procs)  # the cores are shared among the processes, as among workers
    metrics_dir = str(scratch.make("metrics"))
    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus-client as each process imports it
    options = dict(host=host, port=port, grpc_port=grpc_port, drain_timeout=drain_timeout, log_level=log_level)
    s = _Supervisor(target, paths, config, opened, options, metrics_dir)
    signals = [0]
    previous = {sig: signal.signal(sig, lambda *_: signals.__setitem__(0, signals[0] + 1))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    failures: list[str] = []
    passed, ends = 0, None
    try:
        for i in range(procs):
            s.start(i)
        while s.running:
            if signals[0] > passed or (failures and passed == 0):
                passed = max(signals[0], 1)
                for p in s.running:  # the first: drain; a second: exit now
                    p.process.terminate()
                ends = ends or time.monotonic() + drain_timeout + 5.0
            if ends is not None and time.monotonic() > ends:
                for p in s.running:
                    p.process.kill()
            woke = wait([p.asks for p in s.running] + [p.process.sentinel for p in s.running], timeout=0.2)
            for p in list(s.running):
                if p.process.sentinel in woke:
                    why = s.exited(p, ends is not None)
                    failures += [why] if why else []
                elif p.asks in woke:
                    s.asked(p, ends is not None)
    finally:
        for p in s.running:
            p.process.kill()
            p.process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in held:
            sock.close()
        scratch.remove(Path(metrics_dir))
        if saved is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved
    if failures:
        raise TorchshipError("; ".join(failures) + " (its error is above)")
