"""Ray Serve scaling from one run: throughput of `torchship serve --ray` with 1 and 2 replicas under the same
closed-loop load (digits-cnn, single-image binary requests, concurrency 64), and the ratio.

Ray binds every interface it finds, so where it can (root, iproute2) the benchmark runs itself inside a network
namespace with only loopback, created here and deleted afterwards. On a machine with N cores each replica gets
N / replicas threads: the ratio shows what a second replica buys on the same cores, not on a second machine.

    python benchmarks/ray_scale.py [--duration 10] [--concurrency 64]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from torchship import OptimizeOptions, optimize
from torchship.perf import perf


def in_namespace(argv: list[str]) -> int | None:
    """Re-run this script inside a fresh loopback-only namespace; None when namespaces are not available."""
    if os.environ.get("TORCHSHIP_IN_NETNS") or shutil.which("ip") is None:
        return None
    name = f"torchship-bench-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode:
        return None
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, *argv],
                              env={**os.environ, "TORCHSHIP_IN_NETNS": name}).returncode
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)  # only what this run started lives in its namespace
        subprocess.run(["ip", "netns", "delete", name])


def serve_ray(bundle: Path, replicas: int, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "torchship.cli", "serve", str(bundle), "--trust-code", "--ray", "--replicas", str(replicas),
                             "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve --ray exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"serve --ray not ready in 240 s: {log.read_text()[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    code = in_namespace(sys.argv)
    if code is not None:
        sys.exit(code)
    where = f"network namespace {os.environ['TORCHSHIP_IN_NETNS']}" if os.environ.get("TORCHSHIP_IN_NETNS") else \
        "the host (no network namespace available: Ray's own ports bind every interface)"
    work = Path(tempfile.mkdtemp(prefix="torchship-ray-"))
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(1, 32), seconds_per_size=0.3),
                   out=work / "bundle")
    rows = {}
    for replicas in (1, 2):
        proc = serve_ray(res.bundle, replicas, 8000 + replicas, work / f"ray{replicas}.log")
        try:
            perf(f"127.0.0.1:{8000 + replicas}", "digits-cnn", concurrency=[8], duration=2)  # warm every replica
            rows[replicas] = perf(f"127.0.0.1:{8000 + replicas}", "digits-cnn", concurrency=[args.concurrency],
                                  duration=args.duration)[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print(f"Ray Serve, digits-cnn ({res.chosen['name']}), concurrency {args.concurrency}, {os.cpu_count()} cores, in {where}")
    for replicas, r in rows.items():
        print(f"  {replicas} replica{'s' if replicas > 1 else ' '}: {r.throughput:,.0f} req/s, p50 {r.p50_ms:.1f} ms, "
              f"p99 {r.p99_ms:.1f} ms, errors {r.errors or 'none'}")
    print(f"  2 replicas / 1 replica: {rows[2].throughput / rows[1].throughput:.2f}x")


if __name__ == "__main__":
    main()
