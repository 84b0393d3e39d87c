"""Served raw text before and after a change, in one run: the same venv and the same bundle, served in turn by two
source trees (this one, and another commit checked out as a git worktree), round by round, under
benchmarks/loadgen.c with the sentences of text_serving.py through POST /v1/embeddings:

- concurrency 32, one sentence a request: sentences/s, p50, and from the server's own /metrics the share of the wall
  time its model was running and the mean batch size;
- concurrency 1, 32 sentences a request: sentences/s.

Prints each figure per tree as median [low-high] over the rounds, and the ratio new / old per round.

    python benchmarks/text_ab.py --old 79b3d85 --bundle DIR [--rounds 3] [--duration 6]

``--old-args`` and ``--new-args`` add `torchship serve` options to one tree's server; with ``--old HEAD`` the two
trees are the same code, so the run compares the options alone:

    python benchmarks/text_ab.py --old HEAD --new-args="--procs 2" --bundle DIR
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from text_serving import Loadgen, Proc, free_port, sentences

ROOT = Path(__file__).resolve().parents[1]


def metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    get = lambda name: sum(map(float, re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)))  # noqa: E731
    return {"compute": get("torchship_compute_duration_seconds_sum"), "batches": get("torchship_execution_count_total"),
            "items": get("torchship_inference_count_total")}


def spread(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{np.median(v):.3g} [{v.min():.3g}-{v.max():.3g}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the commit to compare with (checked out in a temporary worktree)")
    p.add_argument("--bundle", required=True, help="a bundle that takes text (torchship optimize zoo:minilm)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--old-args", default="", help="serve options for the old tree's server (one string)")
    p.add_argument("--new-args", default="", help="serve options for the new tree's server (one string)")
    args = p.parse_args()
    extra = {"new": shlex.split(args.new_args), "old": shlex.split(args.old_args)}
    work = Path(tempfile.mkdtemp(prefix="text-ab-"))
    old = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.old], check=True)
    texts, load = sentences(2000), Loadgen(work)
    trees = {"new": ROOT / "src", "old": old / "src"}
    rows: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            for name in (("new", "old") if r % 2 == 0 else ("old", "new")):
                port = free_port()
                server = Proc([sys.executable, "-m", "torchship.cli", "serve", args.bundle, "--port", str(port),
                               *extra[name]],
                              f"http://127.0.0.1:{port}/v2/health/ready", work / f"{name}.log",
                              env={"PYTHONPATH": str(trees[name])})
                try:
                    url = f"http://127.0.0.1:{port}/v1/embeddings"
                    load.run(url, "minilm", texts, 1, 32, 2)  # warm: every batch size and length seen once
                    before = metrics(port)
                    rate, p50, _, errors = load.run(url, "minilm", texts, 1, 32, args.duration)
                    after = metrics(port)
                    assert errors == 0, f"{name}: {errors} requests failed"
                    rows.setdefault(f"{name} c32x1 sentences/s", []).append(rate)
                    rows.setdefault(f"{name} c32x1 p50 ms", []).append(p50)
                    rows.setdefault(f"{name} c32x1 model busy (share of wall)", []).append(
                        (after["compute"] - before["compute"]) / args.duration)
                    rows.setdefault(f"{name} c32x1 mean batch", []).append(
                        (after["items"] - before["items"]) / max(1.0, after["batches"] - before["batches"]))
                    rows.setdefault(f"{name} c1x32 sentences/s", []).append(
                        load.run(url, "minilm", texts, 32, 1, args.duration)[0])
                finally:
                    server.stop()
            print(f"round {r + 1} of {args.rounds} done", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(f"CPU cores: {os.cpu_count()}; bundle: {args.bundle}; {len(texts)} sentences; {args.rounds} rounds of "
          f"{args.duration:g} s a load; old = {args.old} {args.old_args}; new = this tree {args.new_args}")
    for key, values in rows.items():
        print(f"  {key:45s} {spread(values)}")
    for load_name in ("c32x1 sentences/s", "c1x32 sentences/s"):
        ratio = np.array(rows[f"new {load_name}"]) / np.array(rows[f"old {load_name}"])
        print(f"  new / old, {load_name:32s} {spread(ratio)} (per round)")


if __name__ == "__main__":
    sys.exit(main())
