"""The parent's side of the variant processes: a fork server that starts them, and a handle to each."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgspec

from .. import scratch
from .protocol import Built, Job, Samples, Stop, TimeBatch, receive, send


class WorkerLost(Exception):
    """The worker process died or did not answer in time; the message says which, with the last line it logged."""


class ForkServer:
    """``python -m torchship.optimize.job``: imports torch once and forks a worker per job."""

    def __init__(self, log: Path | None = None):
        """``log``: where its output goes (None: a temporary directory of its own, removed at ``close``)."""
        self.own = None if log is not None else scratch.make("forkserver")
        self.log = log or self.own / "forkserver.log"
        self.used = False
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "torchship.optimize.job", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        theirs.close()

    def start(self, job: Job) -> "Worker":
        self.used = True
        mine, theirs = socket.socketpair()
        try:
            socket.send_fds(self.control, [msgspec.msgpack.encode(job)], [theirs.fileno()])
            answer = self.control.recv(8)
        except OSError:
            answer = b""
        finally:
            theirs.close()
        if len(answer) != 8:
            mine.close()
            tail = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            raise WorkerLost(f"the worker server exited: {tail[0][:300] if tail else 'no output'}")
        return Worker(mine, int.from_bytes(answer, "little"), Path(job.workdir))

    def close(self) -> None:
        """Its workers go with their connections; it leaves when it reads the closed control socket, which one that
        was never sent a job may not have reached yet (still importing): that one is killed."""
        self.control.close()
        if not self.used:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.own is not None:
            scratch.remove(self.own)


class Worker:
    """One variant's process: ``built()`` once, then ``time()`` as often as asked, then ``close()``."""

    def __init__(self, conn: socket.socket, pid: int, workdir: Path):
        self.conn, self.pid, self.workdir = conn, pid, workdir

    def _call(self, kind, timeout: float):
        self.conn.settimeout(timeout)
        try:
            answer = receive(self.conn, kind)
        except (socket.timeout, TimeoutError):
            self.kill()
            raise WorkerLost(f"timed out after {timeout:.0f}s (raise --timeout to wait longer)") from None
        except OSError as exc:
            answer = None
            del exc
        if answer is None:
            self.kill()
            raise WorkerLost(f"the worker process died: {self.last_line()}")
        return answer

    def built(self, timeout: float) -> Built:
        return self._call(Built, timeout)

    def time(self, request: TimeBatch, timeout: float) -> Samples:
        try:
            send(self.conn, request)
        except OSError:
            self.kill()
            raise WorkerLost(f"the worker process died: {self.last_line()}") from None
        return self._call(Samples, timeout)

    def last_line(self) -> str:
        try:
            lines = [line for line in (self.workdir / "worker.log").read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1][:300] if lines else "no output"

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the worker and the compilers it started
        except (ProcessLookupError, PermissionError):
            pass
        self.conn.close()

    def close(self) -> None:
        try:
            send(self.conn, Stop())
        except OSError:
            pass
        self.conn.close()


class InlineWorker:
    """The same steps in this process, for a model that cannot be sent to another (an nn.Module given from Python
    with no importable architecture): no isolation and no timeout."""

    def __init__(self, job: Job, model):
        from .job import Variant
        self.variant = Variant(job, model)

    def built(self, timeout: float) -> Built:
        from ..errors import first_line
        try:
            return self.variant.build()
        except Exception as exc:
            return Built("failed", first_line(exc))

    def time(self, request: TimeBatch, timeout: float) -> Samples:
        return self.variant.time(request)

    def close(self) -> None:
        self.variant = None
