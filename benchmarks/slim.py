"""The slim install against the full one, measured in one run:

- installed size: the site-packages of a fresh virtual environment with `pip install torchship` (no extras) against
  this environment's (the dev install: every extra);
- time from process start to ready (`/v2/health/ready` 200) serving the same ONNX Runtime bundle of digits-cnn;
- `torchship --help`, start to exit.

Start-up times are interleaved between the two environments, round by round, and shown as median [low-high].
Goals (issue 20): slim under a fifth of the full size; ready at least 3x sooner; --help under 0.5 s.

    python benchmarks/slim.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def site_packages_mb(prefix: Path) -> float:
    site = next((prefix / "lib").glob("python3*/site-packages"))
    total = 0
    for dirpath, _, files in os.walk(site):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 2**20


def env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_ready(prefix: Path, bundle: Path, cwd: Path) -> float:
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([str(prefix / "bin" / "torchship"), "serve", str(bundle), "--port", str(port)], cwd=cwd,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 120:
            if proc.poll() is not None:
                raise RuntimeError(f"torchship serve exited with {proc.returncode} in {prefix}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=0.5).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        raise RuntimeError("not ready in 120 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def help_time(prefix: Path, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(prefix / "bin" / "torchship"), "--help"], cwd=cwd, env=env(), capture_output=True, check=True)
    return time.perf_counter() - start


def spread(values: list[float], unit: str = "s") -> str:
    return f"{np.median(values):.2f} {unit} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchship-slim-"))
    slim, full = work / "slim", Path(sys.prefix)
    subprocess.run([sys.executable, "-m", "venv", str(slim)], check=True)
    subprocess.run([str(slim / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                   check=True, cwd=work, env=env())
    from torchship import OptimizeOptions, optimize
    bundle = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(1, 8)),
                      out=work / "bundle").bundle
    sizes = {name: site_packages_mb(prefix) for name, prefix in (("slim", slim), ("full", full))}
    print(f"installed size (site-packages): slim {sizes['slim']:,.0f} MB, full (every extra) {sizes['full']:,.0f} MB: "
          f"{sizes['slim'] / sizes['full']:.2f} of it (goal < 0.20)")
    ready: dict[str, list[float]] = {"slim": [], "full": []}
    helps: dict[str, list[float]] = {"slim": [], "full": []}
    for name, prefix in (("slim", slim), ("full", full)):  # a first start of each, unmeasured (the page cache)
        time_to_ready(prefix, bundle, work)
    for _ in range(args.rounds):
        for name, prefix in (("slim", slim), ("full", full)):
            ready[name].append(time_to_ready(prefix, bundle, work))
            helps[name].append(help_time(prefix, work))
    ratio = [f / s for f, s in zip(ready["full"], ready["slim"])]
    print(f"start to ready, the same ONNX Runtime bundle: slim {spread(ready['slim'])}, full {spread(ready['full'])}; "
          f"full / slim {np.median(ratio):.2f}x [{min(ratio):.2f}-{max(ratio):.2f}] (goal >= 3x)")
    print(f"torchship --help: slim {spread(helps['slim'])}, full {spread(helps['full'])} (goal < 0.5 s)")
    torch_s = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        subprocess.run([str(full / "bin" / "python"), "-c", "import torch"], cwd=work, env=env(), check=True)
        torch_s.append(time.perf_counter() - start)
    print(f"neither imports torch to serve this bundle; `import torch` alone (what every start paid when serve "
          f"imported it): {spread(torch_s)}")


if __name__ == "__main__":
    main()
