"""Worker processes: each loads its own copy of a bundle with its share of the cores.

The HTTP front keeps the queue and the batcher; a batch goes to a free worker over a pipe. A worker that dies fails
only the batch it held (HTTP 500) and is restarted from the snapshot verified at start (never from the bundle's
directory, which may have changed since); the others keep serving. When no worker is left and none can be restarted,
the pool is ``broken``: the model turns not-ready and its requests get a 503 at once. No call waits forever: a
worker that does not answer within ``run_timeout_s`` is killed (its batch gets a 504) and restarted. A watcher
thread notices a worker that dies while idle at once, so readiness is true only while the model can serve.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time

from ..bundle import Bundle
from ..errors import BundleError, DeadlineExceeded, ModelError, Unavailable, WorkerDied, first_line
from ..machine import cores

class NotSent(WorkerDied):
    """The worker was gone before the batch reached it (so nothing ran: another worker may take the batch)."""


LOAD_TIMEOUT_S = 600.0  # a worker that has not loaded and warmed up by then is killed
RESTART_DELAYS_S = (0.5, 1.0, 2.0)  # the waits before each restart attempt


def _worker_main(verified: Bundle, threads: int, warm_sizes: tuple[int, ...], trust_code: bool, conn) -> None:
    from ..bundle import load
    try:
        runner = load(verified, threads=threads, trust_code=trust_code)  # the snapshot verified at start: not hashed again
        for bs in warm_sizes:
            runner(runner.spec.sample(bs, runner.manifest.dims))
    except Exception as exc:
        conn.send(("failed", first_line(exc, 1000)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            feeds = conn.recv()
        except EOFError:
            return
        if feeds is None:
            return
        try:
            conn.send(("ok", runner(feeds)))
        except Exception as exc:  # the model's own error: reported, the worker lives on
            conn.send(("error", first_line(exc, 1000)))


class _Worker:
    def __init__(self, ctx, verified: Bundle, threads: int, warm_sizes: tuple[int, ...], trust_code: bool):
        self.conn, child = ctx.Pipe()
        # held while a batch is sent and awaited: the watcher that restarts a dead worker closes its pipe only after
        # the caller has seen it die (closing it under a poll let a new worker's pipe take its file descriptor, and
        # the caller waited out the run timeout on the new pipe: a 504 after 30 s instead of a 500 at once)
        self._use = threading.Lock()
        self.proc = ctx.Process(target=_worker_main, args=(verified, threads, warm_sizes, trust_code, child), daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        try:
            if not self.conn.poll(LOAD_TIMEOUT_S):
                raise BundleError(f"worker process {self.pid} did not load the bundle within {LOAD_TIMEOUT_S:g} s")
            status, payload = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.close()
            raise BundleError(f"worker process {self.pid} exited while loading the bundle (exit code "
                              f"{self.proc.exitcode})") from exc
        except BundleError:
            self.close()
            raise
        if status == "failed":
            self.close()
            raise BundleError(f"worker process {self.pid} could not load the bundle: {payload}")

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def call(self, feeds, timeout_s: float):
        with self._use:
            return self._call(feeds, timeout_s)

    def _call(self, feeds, timeout_s: float):
        try:
            self.conn.send(feeds)
        except (OSError, ValueError) as exc:  # gone (or closed as lost) before the batch reached it
            raise NotSent(f"worker process {self.pid} was gone before it got this batch") from exc
        try:
            if not self.conn.poll(timeout_s):
                self.proc.kill()
                raise DeadlineExceeded(f"the model gave no answer within {timeout_s:g} s; its worker process "
                                       f"{self.pid} was killed and is being restarted")
            status, payload = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"worker process {self.pid} died while running this batch (exit code "
                             f"{self.proc.exitcode})") from exc
        if status == "error":
            raise ModelError(payload)
        return payload

    def close(self):
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        with self._use:  # the process is gone: a caller still waiting on it sees the pipe's end and lets go
            self.conn.close()


class ProcessPool:
    """``pool(feeds) -> outputs`` on whichever worker is free; safe to call from several threads."""

    def __init__(self, verified: Bundle, workers: int, threads_each: int | None = None, warm_sizes: tuple[int, ...] = (1,),
                 trust_code: bool = False, run_timeout_s: float = 300.0):
        self.bundle, self.size, self.warm, self.trust_code = verified, workers, tuple(warm_sizes), trust_code
        self.threads = threads_each or max(1, cores() // workers)
        self.run_timeout_s = run_timeout_s
        self._ctx = mp.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._restarting = 0
        self._closed = False
        self.restarts = 0
        self.broken: str | None = None  # why no worker can run a batch, once none is left and none came back
        try:
            for _ in range(workers):
                self._add(self._new())
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._watch, daemon=True, name="torchship-workers").start()

    def _watch(self) -> None:
        """Restart a worker as soon as it dies, busy or idle."""
        from multiprocessing.connection import wait
        while not self._closed:
            with self._lock:
                workers = list(self._all)
            if not workers:
                time.sleep(0.1)
                continue
            for sentinel in wait([w.proc.sentinel for w in workers], timeout=0.25):
                self._lost(next(w for w in workers if w.proc.sentinel == sentinel))

    def _new(self) -> _Worker:
        return _Worker(self._ctx, self.bundle, self.threads, self.warm, self.trust_code)

    def _add(self, w: _Worker) -> None:
        with self._lock:
            if self._closed:
                w.close()
                return
            self._all.append(w)
        self._idle.put(w)

    def _take(self) -> _Worker:
        while True:
            if self.broken:
                raise Unavailable(f"the model cannot serve: {self.broken}")
            try:
                w = self._idle.get(timeout=0.2)
            except queue.Empty:
                continue
            if w.alive:
                return w
            self._lost(w)  # died while idle (the watcher may have seen it first): take another

    def _lost(self, w: _Worker) -> None:
        with self._lock:
            if w not in self._all or self._closed:
                return  # already being restarted
            self._all.remove(w)
            self.restarts += 1
            self._restarting += 1
        threading.Thread(target=self._restart, args=(w,), daemon=True, name="torchship-restart").start()

    def _restart(self, dead: _Worker) -> None:
        dead.close()
        why = "closed"
        for delay in RESTART_DELAYS_S:
            if self._closed:
                break
            try:
                w = self._new()
            except Exception as exc:
                why = first_line(exc)
                time.sleep(delay)
                continue
            with self._lock:
                self._restarting -= 1
            self._add(w)
            return
        with self._lock:
            self._restarting -= 1
            if not self._all and not self._restarting and not self._closed:
                self.broken = f"its worker processes died and could not be restarted ({why})"

    def __call__(self, feeds):
        """A batch that no worker received (the one taken died between the check that it lives and the send) goes to
        the next one: only a worker that dies while running a batch fails it."""
        for _ in range(self.size + 2):
            w = self._take()
            try:
                result = w.call(feeds, self.run_timeout_s)
            except NotSent:
                self._lost(w)
                continue
            except (WorkerDied, DeadlineExceeded):
                self._lost(w)
                raise
            except BaseException:
                self._idle.put(w)
                raise
            self._idle.put(w)
            return result
        raise WorkerDied(f"{self.size + 2} worker processes in turn were gone before they got this batch")

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._all]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for w in workers:
            w.close()
