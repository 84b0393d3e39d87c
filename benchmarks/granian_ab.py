"""Whether a compiled ASGI server beats uvicorn as torchship's front: the same app (torchship's, over the same
digits-cnn bundle) under `torchship serve` (uvicorn, one process), under granian (Rust, ASGI, one worker), and, for
several processes, `torchship serve --procs 2` against granian with two workers; interleaved rounds, each under
benchmarks/loadgen.c (concurrency 64 binary and JSON requests, concurrency 1 p50). Needs granian, which torchship
does not depend on: pip install granian.

    python benchmarks/granian_ab.py [--rounds 2] [--duration 4]
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

from front_ab import ROOT, build
from serving import Load, Server, free_port, spread, wait_ready

APP = '''
import os, tempfile
from pathlib import Path
from torchship.serve.app import ServeConfig, open_bundles
from torchship.serve.http import create_app
paths = [Path(os.environ["TORCHSHIP_BENCH_BUNDLE"])]
config = ServeConfig(threads=int(os.environ["TORCHSHIP_BENCH_THREADS"]) or None)
app = create_app(paths, config, open_bundles(paths, Path(tempfile.mkdtemp()), config))
'''


class Granian:
    """torchship's ASGI app (its lifespan starts the models) under granian, ``workers`` processes."""

    def __init__(self, work: Path, bundle: Path, workers: int):
        self.port = free_port()
        env = {**os.environ, "TORCHSHIP_BENCH_BUNDLE": str(bundle),
               "TORCHSHIP_BENCH_THREADS": str(max(1, os.cpu_count() // workers) if workers > 1 else 0),
               "PYTHONPATH": os.pathsep.join([str(work), str(ROOT / "src")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--no-ws",
                                      "--port", str(self.port), "--workers", str(workers), "torchship_bench_app:app"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work, env=env)
        wait_ready(self.port, "granian")
        self.url = f"127.0.0.1:{self.port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=4.0)
    args = p.parse_args()
    if shutil.which("granian") is None and subprocess.run([sys.executable, "-c", "import granian"]).returncode:
        sys.exit("benchmarks/granian_ab.py needs granian: pip install granian")
    work = Path(tempfile.mkdtemp(prefix="torchship-granian-"))
    (work / "torchship_bench_app.py").write_text(APP)
    bundle = work / "bundle"
    build(ROOT / "src", bundle)
    load = Load(work)
    fronts = {"uvicorn (torchship serve)": lambda: Server(bundle, src=ROOT / "src", cwd=work),
              "granian, 1 worker": lambda: Granian(work, bundle, 1),
              "torchship serve --procs 2": lambda: Server(bundle, "--procs", "2", src=ROOT / "src", cwd=work),
              "granian, 2 workers": lambda: Granian(work, bundle, 2)}
    rows = {f: {"binary": [], "json": [], "c1": []} for f in fronts}
    for _ in range(args.rounds):
        for front, start in fronts.items():
            with start() as s:
                time.sleep(1.0)  # every process listening
                rows[front]["binary"].append(load(s.url, "digits-cnn", "closed", 64, args.duration).throughput)
                as_json = load.request(s.url, "digits-cnn", binary=False)
                rows[front]["json"].append(load(s.url, "digits-cnn", "closed", 64, args.duration, request=as_json).throughput)
                rows[front]["c1"].append(load(s.url, "digits-cnn", "closed", 1, args.duration / 2).pct(50))
    print(f"digits-cnn (ONNX Runtime), {args.rounds} interleaved rounds, {os.cpu_count()} cores shared with the load "
          "generator; median [low-high]")
    for front, r in rows.items():
        print(f"  {front:<27} c64 binary {spread(r['binary'], '{:,.0f}')} req/s, c64 JSON (16 KB) "
              f"{spread(r['json'], '{:,.0f}')}, c1 p50 {spread(r['c1'], '{:.2f}')} ms")
    for a, b in (("granian, 1 worker", "uvicorn (torchship serve)"), ("granian, 2 workers", "torchship serve --procs 2")):
        ratios = {k: spread([x / y for x, y in zip(rows[a][k], rows[b][k])]) for k in ("binary", "json", "c1")}
        print(f"  {a} / {b}: binary {ratios['binary']}, JSON {ratios['json']}, c1 p50 {ratios['c1']}")


if __name__ == "__main__":
    main()
