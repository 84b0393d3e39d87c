"""Worker processes: each loads its own copy of a bundle with its share of the cores.

The HTTP front keeps the queue and the batcher; a batch goes to a free worker over a pipe. A worker
that dies fails only the batch it held (HTTP 500) and is restarted; the others keep serving.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
from pathlib import Path

from ..machine import cores


class WorkerDied(RuntimeError):
    pass


def _worker_main(path: str, threads: int, warm_sizes: tuple[int, ...], conn) -> None:
    from ..bundle import load
    runner = load(Path(path), threads=threads)
    for bs in warm_sizes:
        runner(runner.spec.sample(bs, runner.manifest.get("dims") or {}))
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
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, ctx, path: str, threads: int, warm_sizes: tuple[int, ...]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(path, threads, warm_sizes, child), daemon=True)
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
            raise RuntimeError(payload)
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

    def __init__(self, path: Path, workers: int, threads_each: int | None = None, warm_sizes: tuple[int, ...] = (1,)):
        self.path, self.size, self.warm = str(path), workers, tuple(warm_sizes)
        self.threads = threads_each or max(1, cores() // workers)
        self._ctx = mp.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0
        for _ in range(workers):
            self._add(_Worker(self._ctx, self.path, self.threads, self.warm))

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
            threading.Thread(target=lambda: self._add(_Worker(self._ctx, self.path, self.threads, self.warm)), daemon=True).start()
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
