"""The serving front before and after a change, in one run: the same venv, two source trees (this one, and
another commit checked out as a git worktree), each serving its own digits-cnn bundle (ONNX Runtime) in turn,
round by round, under benchmarks/loadgen.c:

- concurrency 64, single-image binary requests: req/s;
- concurrency 64, single-image JSON requests (16 KB bodies): req/s;
- concurrency 1: p50;
- open loop, Poisson at twice each tree's own c64 capacity, --slo-ms 50: goodput as a fraction of that capacity;
- the server's CPU to refuse a request (an unknown model, 64 connections), and as a fraction of serving one.

Prints each figure per tree as median [low-high] over the rounds, and the ratio new / old per round. With
``--procs N``, this tree serves from N server processes on the port (``serve --procs N``).

    python benchmarks/front_ab.py --old cbf2f30 [--procs 2] [--rounds 3] [--duration 4]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving import Load, Server, measured, spread

ROOT = Path(__file__).resolve().parents[1]


def build(src: Path, out: Path) -> None:
    code = ("from torchship import optimize, OptimizeOptions; optimize('zoo:digits-cnn', OptimizeOptions("
            f"runtimes=('onnxrt',), batch_sizes=(1, 8, 64), seconds_per_size=0.3), out={str(out)!r})")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(src)}, check=True,
                   capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the commit to compare with (checked out in a temporary worktree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--procs", type=int, default=1, help="server processes for this tree (serve --procs)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchship-ab-"))
    old = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.old], check=True)
    try:
        trees = {"old": old / "src", "new": ROOT / "src"}
        bundles = {k: work / f"bundle-{k}" for k in trees}
        for k, src in trees.items():
            build(src, bundles[k])
        load = Load(work)
        figures = {k: {"binary": [], "json": [], "c1": [], "slo": [], "refusal": [], "r": []} for k in trees}
        procs = {"old": [], "new": ["--procs", str(args.procs)] if args.procs > 1 else []}
        for _ in range(args.rounds):
            for k, src in trees.items():
                with Server(bundles[k], *procs[k], src=src, cwd=work) as served:
                    time.sleep(1.0)  # every server process listening
                    url = served.url
                    f = figures[k]
                    run, served_us = measured(served.proc.pid, load, url, "digits-cnn", "closed", 64, args.duration)
                    f["binary"].append(run.throughput)
                    as_json = load.request(url, "digits-cnn", binary=False)
                    f["json"].append(load(url, "digits-cnn", "closed", 64, args.duration, request=as_json).throughput)
                    f["c1"].append(load(url, "digits-cnn", "closed", 1, args.duration / 2).pct(50))
                    missing = load.request(url, "digits-cnn", path="/v2/models/no-such-model/infer")
                    _, refused_us = measured(served.proc.pid, load, url, "digits-cnn", "closed", 64, args.duration / 2,
                                             request=missing)
                    f["refusal"].append(refused_us * 1e6)
                    f["r"].append(refused_us / served_us)
                with Server(bundles[k], "--max-batch-size", "64", "--slo-ms", "50", *procs[k], src=src, cwd=work) as served:
                    time.sleep(1.0)
                    url = served.url
                    capacity = figures[k]["binary"][-1]
                    run = load(url, "digits-cnn", "poisson", 2 * capacity, args.duration)
                    f["slo"].append(run.goodput(50) / capacity)
        rows = [("c64 binary, req/s", "binary", "{:,.0f}"), ("c64 JSON (16 KB), req/s", "json", "{:,.0f}"),
                ("c1 p50, ms", "c1", "{:.3f}"), ("Poisson 2x, --slo-ms 50: goodput / capacity", "slo", "{:.2f}"),
                ("server CPU to refuse (404, c64), us", "refusal", "{:.1f}"), ("  as a fraction of serving one", "r", "{:.2f}")]
        print(f"old = {args.old}, new = this tree{f' with --procs {args.procs}' if args.procs > 1 else ''}; {args.rounds} interleaved rounds, {os.cpu_count()} cores shared "
              "with the load generator")
        for label, key, fmt in rows:
            a, b = figures["old"][key], figures["new"][key]
            ratio = [y / x for x, y in zip(a, b) if x]
            print(f"  {label:<46} old {spread(a, fmt)}  new {spread(b, fmt)}  new/old {spread(ratio)}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
