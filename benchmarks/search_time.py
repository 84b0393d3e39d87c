"""Where one search's time goes: `torchship optimize MODEL --no-cache` as a new machine runs it (torch.compile's
inductor cache in a fresh directory, the build cache off), with every step the search announces stamped with the
seconds since it started, then each variant's worker time (build, verification, first timing; two or more build at
once, so these add up to more than the wall time) and what became of it.

    python benchmarks/search_time.py [--model zoo:minilm] [--warm-inductor] [--out DIR]

One run; the machine's load while it ran is in the report the bundle carries. Run it with nothing else running.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:minilm")
    ap.add_argument("--warm-inductor", action="store_true", help="keep torch.compile's own cache (default: a fresh one)")
    ap.add_argument("--out", default=None, help="bundle directory (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.warm_inductor:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")  # before torch is imported
        from torchship.machine import cpu
        from torchship.optimize import OptimizeOptions, optimize
        name, flags = cpu()
        isa = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16")
                     or f.startswith("amx"))
        print(f"CPU: {name}, {os.cpu_count()} cores, ISA: {', '.join(isa) or 'none of AVX2, AVX-512, AMX'}"
              f"{'' if any(f.startswith('amx') for f in isa) else ' (no AMX)'}")
        print(f"inductor cache: {'warm (your own)' if args.warm_inductor else 'empty, as on a new machine'}")
        t0, last = time.perf_counter(), [None]

        def say(msg: str, i: int, n: int) -> None:
            if msg != last[0]:
                print(f"{time.perf_counter() - t0:7.1f} s  [{i}/{n}] {msg}", flush=True)
                last[0] = msg
        res = optimize(args.model, OptimizeOptions(cache=False), out=args.out or os.path.join(tmp, "bundle"), progress=say)
        wall = time.perf_counter() - t0
        print(f"\nsearch: {wall:.0f} s in all, chose {res.chosen.name}")
        if res.decision is not None:
            print(res.decision.why)
        print(f"{'variant':30s} {'status':9s} {'worker s':>8s}  why")
        for v in res.variants:
            why = "" if v.status == "ok" else v.reason
            print(f"{v.name:30s} {v.status:9s} {v.wall_s or 0:8.1f}  {why[:100]}")
        print(f"worker seconds in all: {sum(v.wall_s or 0 for v in res.variants):.0f}")


if __name__ == "__main__":
    sys.exit(main())
