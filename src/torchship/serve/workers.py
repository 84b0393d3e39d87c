"""Worker processes: each loads its own copy of a bundle with its share of the cores.

The HTTP front keeps the queue and the batcher; a batch goes to a free worker over a pipe. A worker
that dies fails only the batch it held (HTTP 500) and is restarted; the others keep serving.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading

from ..bundle import Bundle
from ..errors import ModelError, WorkerDied
from ..machine import cores


def _worker_main(verified: Bundle, threads: int, warm_sizes: tuple[int, ...], trust_code: bool, conn) -> None:
    from ..bundle import load
    runner = load(verified, threads=threads, trust_code=trust_code)  # the snapshot verified at start: not hashed again
    for bs in warm_sizes:
        runner(runner.spec.sample(bs, runner.manifest.dims))
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
            from ..errors import first_line
            conn.send(("error", first_line(exc, 1000)))


class _Worker:
    def __init__(self, ctx, verified: Bundle, threads: int, warm_sizes: tuple[int, ...], trust_code: bool):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(verified, threads, warm_sizes, trust_code, child), daemon=True)
        self.proc.start()
        child.close()
        status, self.pid = self.conn.recv()

    def call(self, feeds):
        try:
            self.conn.send(feeds)
            status, payload = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as exc:
            raise WorkerDied(f"worker process {self.pid} died while running this batch") from exc
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


class ProcessPool:
    """``pool(feeds) -> outputs`` on whichever worker is free; safe to call from several threads."""

    def __init__(self, verified: Bundle, workers: int, threads_each: int | None = None, warm_sizes: tuple[int, ...] = (1,),
                 trust_code: bool = False):
        self.bundle, self.size, self.warm, self.trust_code = verified, workers, tuple(warm_sizes), trust_code
        self.threads = threads_each or max(1, cores() // workers)
        self._ctx = mp.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0
        for _ in range(workers):
            self._add(self._new())

    def _new(self) -> _Worker:
        return _Worker(self._ctx, self.bundle, self.threads, self.warm, self.trust_code)

    def _add(self, w: _Worker) -> None:
        with self._lock:
            self._all.append(w)
        self._idle.put(w)

    def __call__(self, feeds):
        w = self._idle.get()
        try:
            result = w.call(feeds)
        except WorkerDied:
            with self._lock:
                self._all.remove(w)
                self.restarts += 1
            w.close()
            threading.Thread(target=lambda: self._add(self._new()), daemon=True).start()
            raise
        self._idle.put(w)
        return result

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._all]

    def close(self) -> None:
        with self._lock:
            workers, self._all = self._all, []
        for w in workers:
            w.close()
