"""A real server on 127.0.0.1, started by the test as a subprocess and stopped by its pid."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from torchship import OptimizeOptions, optimize

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models_importable() -> dict:
    """serve never imports from its working directory: the bundles of tests.models find it on PYTHONPATH."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


class Running:
    def __init__(self, args, log, env: dict | None = None):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "torchship.cli", "serve", *map(str, args), "--port", str(self.port)],
                                     cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **models_importable(), **(env or {})})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(log).read_text()[-2000:]}")
            try:
                if httpx.get(f"http://{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in 90 s: {Path(log).read_text()[-2000:]}")

    def http(self, method, path, **kw):
        return httpx.request(method, f"http://{self.url}{path}", timeout=30, **kw)

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.http("GET", "/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for(condition, what: str, seconds: float = 60.0):
    """Polls ``condition`` until it is true (returning its value). The bound only keeps a broken server from hanging
    the suite: it fails the test saying what never happened, and never decides a result."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {seconds:.0f} s: {what}")
        time.sleep(0.01)


class Gate:
    """Sets the pace of ``tests.models.Slow`` (and ``Hang``) in a server started with ``env=gate.env``: ``close()``
    and each batch that starts waits in the model until ``open()``; ``held()`` lists (pid, size) of the batches that
    started while closed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.env = {"TORCHSHIP_TEST_GATE": str(self.path)}

    def close(self) -> None:
        self.path.touch()

    def open(self) -> None:
        self.path.unlink(missing_ok=True)

    def held(self) -> list[tuple[int, int]]:
        log = Path(f"{self.path}.held")
        return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []

    def wait_held(self, n: int) -> list[tuple[int, int]]:
        return wait_for(lambda: len(self.held()) >= n and self.held(), f"{n} batch(es) held in the model")


@pytest.fixture
def gate(tmp_path):
    g = Gate(tmp_path / "gate")
    yield g
    g.open()  # never leave a server's model waiting


@pytest.fixture
def server(tmp_path):
    started = []

    def start(*args, env=None):
        s = Running(args, tmp_path / f"server{len(started)}.log", env)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "digits"
    optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(1, 8), seconds_per_size=0.05), out=out)
    return out


@pytest.fixture(scope="session")
def slow_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "slow"  # eager fp32 only: what is tested is the server (test_abuse.py)
    optimize("tests.models:Slow", OptimizeOptions(runtimes=("eager",), transforms=(), batch_sizes=(1, 4),
                                                seconds_per_size=0.01), out=out,
             name="slow")
    return out


@pytest.fixture
def repository(tmp_path, digits_bundle):
    repo = tmp_path / "repo"
    shutil.copytree(digits_bundle, repo / "digits-cnn" / "1")
    return repo
