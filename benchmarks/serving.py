"""Serving figures from one run on digits-cnn with single-image requests (binary tensors):

- served throughput at concurrency 64, as a ratio to the offline batched throughput of the same Runner
  and to the same server with batching off (--max-batch-size 1);
- p50 at concurrency 1;
- an open-loop Poisson load at twice the measured capacity with --slo-ms: goodput as a fraction of
  capacity and the p99 of accepted requests against the SLO.

The load generator (torchship perf, Python) runs on the same cores as the server: on a 2-core machine
it takes a large share of them, so served figures here are a floor.

digits-cnn costs about 2 us an item offline, so on it an HTTP request is the whole cost. `--minilm` adds the same
two ratios on MiniLM (single sentences of 64 tokens, ONNX Runtime), a model whose compute dominates, to show what
the batcher itself gives up against offline batching.

    python benchmarks/serving.py [--duration 5] [--slo-ms 50] [--minilm]
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

from torchship import OptimizeOptions, load_bundle, optimize
from torchship.perf import perf
from torchship.profile import measure
from torchship.zoo.digits import dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, *args: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "torchship.cli", "serve", str(bundle), "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __enter__(self):
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--minilm", action="store_true", help="also serve MiniLM (needs the nlp extra)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchship-bench-"))
    res = optimize("zoo:digits-cnn", OptimizeOptions(batch_sizes=(1, 8, 64), seconds_per_size=0.5), out=work / "bundle")
    runner = load_bundle(res.bundle)
    x = dataset()["test"][0]
    offline = 64 / (measure(runner, {"image": x[:64]}, seconds=2.0)["p50_ms"] / 1e3)
    print(f"digits-cnn bundle: {res.chosen['name']}; offline batched throughput at batch 64: {offline:,.0f} items/s "
          f"({os.cpu_count()} cores, server and load generator share them)")
    rows = {}
    for label, extra in (("batching", ["--max-batch-size", "64"]), ("no batching", ["--max-batch-size", "1"])):
        with Server(res.bundle, *extra) as url:
            rows[label] = perf(url, "digits-cnn", concurrency=[64], duration=args.duration)[0]
            if label == "batching":
                rows["c1"] = perf(url, "digits-cnn", concurrency=[1], duration=args.duration)[0]
    served, unbatched = rows["batching"], rows["no batching"]
    print(f"concurrency 64, batching on : {served.throughput:,.0f} req/s, p50 {served.p50_ms:.1f} ms, p99 {served.p99_ms:.1f} ms, "
          f"avg batch {served.avg_batch or 0:.1f}, errors {served.errors or 'none'}")
    print(f"concurrency 64, batching off: {unbatched.throughput:,.0f} req/s, p99 {unbatched.p99_ms:.1f} ms")
    print(f"  served / offline batched throughput: {served.throughput / offline:.3f}  (goal >= 0.8)")
    print(f"  batching on / off:                   {served.throughput / unbatched.throughput:.2f}x  (goal >= 3)")
    print(f"concurrency 1: p50 {rows['c1'].p50_ms:.2f} ms, {rows['c1'].throughput:,.0f} req/s")
    capacity = served.throughput
    with Server(res.bundle, "--max-batch-size", "64", "--slo-ms", str(args.slo_ms)) as url:
        over = perf(url, "digits-cnn", rate=2 * capacity, poisson=True, duration=args.duration)[0]
    print(f"open loop, Poisson at 2x capacity ({2 * capacity:,.0f} req/s offered) with --slo-ms {args.slo_ms:g}: "
          f"goodput {over.throughput:,.0f} req/s = {over.throughput / capacity:.2f} of capacity (goal >= 0.9); "
          f"p99 of accepted {over.p99_ms or float('nan'):.1f} ms (SLO {args.slo_ms:g} ms); rejected {over.errors or 'none'}")
    if args.minilm:
        minilm(work, args.duration)


def minilm(work: Path, duration: float, seq: int = 64, batch: int = 16) -> None:
    res = optimize("zoo:minilm", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(1, batch), seconds_per_size=1.0,
                                                 transforms=()), dims={"seq": seq}, out=work / "minilm")
    runner = load_bundle(res.bundle)
    feeds = runner.spec.sample(batch, {"seq": seq}, seed=0)
    offline = batch / (measure(runner, feeds, seconds=3.0)["p50_ms"] / 1e3)
    single = 1 / (measure(runner, {k: v[:1] for k, v in feeds.items()}, seconds=3.0)["p50_ms"] / 1e3)
    rows = {}
    for label, size in (("batching", batch), ("no batching", 1)):
        with Server(res.bundle, "--max-batch-size", str(size)) as url:
            rows[label] = perf(url, "minilm", concurrency=[64], duration=duration, dims={"seq": seq})[0]
    on, off = rows["batching"], rows["no batching"]
    print(f"MiniLM, one sentence of {seq} tokens per request, concurrency 64: batching on {on.throughput:,.1f} req/s "
          f"(avg batch {on.avg_batch or 0:.1f}, p99 {on.p99_ms:.0f} ms), off {off.throughput:,.1f} req/s; offline at "
          f"batch {batch}: {offline:,.1f} items/s")
    print(f"  served / offline batched throughput: {on.throughput / offline:.3f}  (goal >= 0.8)")
    print(f"  batching on / off:                   {on.throughput / off.throughput:.2f}x  (bounded by what batching "
          f"gives offline: batch {batch} / batch 1 = {offline / single:.2f}x on this CPU)")


if __name__ == "__main__":
    main()
