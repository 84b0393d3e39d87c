"""How many intra-op threads a model that runs on the event loop should get: digits-cnn's ONNX Runtime session, as
`torchship serve` loads it for a batch that runs on the loop (pool threads that sleep rather than spin), timed
with one thread and with one a core, in interleaved rounds, at batch sizes 1, 8 and 64. Ratios are taken within
each round: median [low-high] over the rounds.

    python benchmarks/threads_ab.py [--rounds 5] [--seconds 0.3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from serving import spread
from torchship import OptimizeOptions, optimize
from torchship.bundle import read
from torchship.machine import cores
from torchship.runtimes.onnxrt import session

SIZES = (1, 8, 64)


def per_batch_us(sess, name: str, batch: np.ndarray, seconds: float) -> float:
    for _ in range(20):
        sess.run(None, {name: batch})
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sess.run(None, {name: batch})
        runs += 1
    return (time.perf_counter() - start) / runs * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.3, help="timing per batch size, per round and thread count")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchship-threads-"))
    options = OptimizeOptions(runtimes=("onnxrt",), transforms=(), batch_sizes=(1, 8, 64), seconds_per_size=0.3)
    res = optimize("zoo:digits-cnn", options, out=work / "bundle")
    b = read(res.bundle)
    model = res.bundle / b.manifest.artifact.files[0]
    many = cores()
    sessions = {t: session(model, threads=t, spin=False) for t in (1, many)}
    name = sessions[1].get_inputs()[0].name
    rng = np.random.default_rng(0)
    batches = {n: rng.standard_normal((n, 1, 28, 28)).astype(np.float32) for n in SIZES}
    times = {(t, n): [] for t in sessions for n in SIZES}
    for _ in range(args.rounds):
        for t, sess in sessions.items():
            for n in SIZES:
                times[t, n].append(per_batch_us(sess, name, batches[n], args.seconds))
    print(f"digits-cnn on ONNX Runtime ({b.manifest.runtime}), pool threads that sleep between operators, {many} cores, "
          f"{args.rounds} interleaved rounds (median [low-high]):")
    for n in SIZES:
        ratio = [a / c for a, c in zip(times[many, n], times[1, n])]
        print(f"  batch {n:>2}: 1 thread {spread(times[1, n], '{:.1f}')} us, {many} threads "
              f"{spread(times[many, n], '{:.1f}')} us; {many} threads / 1: {spread(ratio)}")


if __name__ == "__main__":
    main()
