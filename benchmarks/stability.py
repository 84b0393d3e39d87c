"""Does optimize's choice hold under noise? One run of this script: optimize three times on digits-cnn and twice on
MiniLM, the last run of each while another process keeps one core busy; the build cache is off, so every run builds,
and each writes a bundle, as a user's run does (so raw input takes part in the choice: ``optimize.raw``).

It prints, per model: the choice of each run (with its declared ties), how often the runs agree (a run agrees when
its choice is another run's choice or one of its declared ties), each variant's ratio to eager with the spread of
that ratio over the runs, whether any run called a variant faster than another where its own evidence (the ratio
round by round, or the two intervals) does not bear that out,
and optimize's wall time against the goals (digits-cnn within 60 s, MiniLM within 5 minutes).

    python benchmarks/stability.py [--models digits-cnn,minilm] [--runs 3,2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torchship import OptimizeOptions, optimize
from torchship.report import ratios

GOALS_S = {"digits-cnn": 60.0, "minilm": 300.0}


def busy_core() -> subprocess.Popen:
    """Another process that keeps one core busy, as on a shared machine (stopped by its pid afterwards)."""
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])


def run_once(name: str, busy: bool):
    spinner = busy_core() if busy else None
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:  # a bundle, as a user gets one: raw input takes part in the choice
            res = optimize(f"zoo:{name}", OptimizeOptions(cache=False), out=Path(out) / "bundle")
        return res, time.perf_counter() - t0
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def unsupported_claims(res) -> int:
    """Claims of 'faster' that their own evidence does not bear out: the decision's beyond-noise claim, checked against
    the ratio round by round where the two shared rounds (its interval above 1), else their two intervals (apart)."""
    d = res.decision
    if d is None or not d.beyond_noise:
        return 0
    if d.paired is not None:
        return int(d.paired[1] <= 1.0)
    return int(d.interval[0] <= d.runner_up_interval[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-cnn,minilm")
    p.add_argument("--runs", default="3,2", help="runs per model, in the order of --models (the last one under load)")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs visible; build cache off; the last run of each model shares the machine with a busy loop")
    for name, n in zip(args.models.split(","), (int(r) for r in args.runs.split(","))):
        runs = []
        for i in range(n):
            busy = i == n - 1 and n > 1
            res, wall = run_once(name, busy)
            runs.append((res, wall, busy))
            d = res.decision
            noise = res.noise.describe(res.machine["cores"]) if res.noise else "no noise figures"
            print(f"{name} run {i + 1}{' (one core busy)' if busy else ''}: chose {d.chosen if d else None}"
                  + (f", tied with {', '.join(d.tied)}" if d and d.tied else "")
                  + (f", {d.runner_up} round by round {d.paired[0]:.3f}x [{d.paired[1]:.3f}-{d.paired[2]:.3f}]"
                     if d and d.paired else "") + f"; {wall:.0f} s wall "
                  f"(goal {GOALS_S.get(name, 0):.0f} s); {noise}")
        accepted = [{r.decision.chosen, *r.decision.tied} for r, _, _ in runs if r.decision]
        chosen = [r.decision.chosen for r, _, _ in runs if r.decision]
        agree = sum(all(c in other for other in accepted) for c in chosen)
        print(f"{name}: the same choice (or a declared tie) in {agree} of {len(runs)} runs (goal {len(runs)} of {len(runs)}); "
              f"claims of 'faster' their evidence does not bear out: {sum(unsupported_claims(r) for r, _, _ in runs)} "
              f"(goal 0); "
              f"wall {min(w for _, w, _ in runs):.0f}-{max(w for _, w, _ in runs):.0f} s (goal {GOALS_S.get(name, 0):.0f} s)")
        table = {}
        for r, _, _ in runs:
            for variant, q in ratios(r).items():
                if q.vs_eager:
                    table.setdefault(variant, []).append(q.vs_eager)
        width = max(map(len, table), default=20) + 2
        print(f"  {'variant':<{width}}{'vs eager, each run':<34}spread (max/min)")
        for variant, values in table.items():
            print(f"  {variant:<{width}}{', '.join(f'{v:.2f}x' for v in values):<34}{max(values) / min(values):.2f}")


if __name__ == "__main__":
    main()
