"""torch.compile at the shapes a search (and a server) sends: the dimensions the spec names marked dynamic up front
(``runtimes.compile.symbolic``, what the compile runtime does) against torch's default (a graph for the first shape,
another once a second size makes torch mark that dimension dynamic, more for each other dimension that varies).

MiniLM in bf16 with inductor's freezing, as the ``compile-bf16`` variant. First each way takes the same nine shapes in
a process of its own with inductor's cache in a fresh directory (cold compiles, nothing shared), as a search's
worker sends them (the verification batch, batch 1, other lengths): how many graphs it compiled and the seconds those
first calls took. Then one process times both in interleaved rounds at batch 32 x seq 128 and batch 8 x seq 32
(each behind a forward of its own code, so that torch keeps their graphs apart): items/s with the interval over
rounds, and the ratio round by round. Goal: fewer compiles at the same speed (a tie inside the noise counts as the
same).

    python benchmarks/compile_shapes.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import types

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchship-inductor-")  # before torch: cold compiles

import torch  # noqa: E402
from torch import nn  # noqa: E402

from torchship.machine import cpu  # noqa: E402
from torchship.measure import estimate, interleave, paired  # noqa: E402
from torchship.runtimes.base import BuildOptions  # noqa: E402
from torchship.runtimes.compile import symbolic  # noqa: E402
from torchship.runtimes.eager import prepare  # noqa: E402
from torchship.sources import load_source  # noqa: E402

SHAPES = [(8, 128), (32, 128), (1, 24), (32, 40), (8, 16), (1, 128), (32, 64), (16, 100), (4, 7)]
TIMED = [(32, 128), (8, 32)]


def feeds(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    return torch.randint(1000, 2000, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long)


def own_code(module: nn.Module, tag: str) -> nn.Module:
    """``module`` behind a forward with a code object of its own: torch caches compiled graphs by code object, and
    two copies of one model would otherwise share them."""
    class Own(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids, attention_mask)
    code = Own.forward.__code__.replace(co_name=f"forward_{tag}")
    Own.forward = types.FunctionType(code, Own.forward.__globals__, f"forward_{tag}")
    return Own(module)


def ways(model, copies: bool) -> dict:
    from torch._inductor import list_mode_options
    base = prepare(model.module, BuildOptions(precision="bf16"), "cpu").eval()
    options = {**list_mode_options("default"), "freezing": True}
    wrap = (lambda m, tag: own_code(copy.deepcopy(m), tag)) if copies else (lambda m, tag: m)
    return {"torch's default": lambda: torch.compile(wrap(base, "default"), options=options),
            "marked dynamic": lambda: symbolic(torch.compile(wrap(base, "marked"), options=options), model.spec)}


def call(fn, shape):
    with torch.inference_mode():
        return fn(*feeds(*shape))


def first_calls(label: str) -> None:
    """In a process of its own: one way's graphs and seconds over ``SHAPES``."""
    from torch._dynamo.utils import counters
    fn = ways(load_source("zoo:minilm"), copies=False)[label]()
    t0 = time.perf_counter()
    for shape in SHAPES:
        call(fn, shape)
    print(f"{label}: {counters['stats']['unique_graphs']} graphs compiled for {len(SHAPES)} shapes, first calls "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--first-calls", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first_calls:
        return first_calls(args.first_calls)
    name, flags = cpu()
    print(f"CPU: {name}; {torch.get_num_threads()} threads; flags: "
          f"{', '.join(sorted(f for f in flags if f.startswith(('avx512_bf16', 'avx512_vnni', 'amx'))) or 'no avx512_bf16, VNNI or AMX')}")
    model = load_source("zoo:minilm")
    for label in ways(model, copies=False):
        subprocess.run([sys.executable, __file__, "--first-calls", label], check=True, stderr=subprocess.DEVNULL)
    made = {label: make() for label, make in ways(model, copies=True).items()}
    from torch._dynamo.utils import counters
    for fn in made.values():
        for shape in SHAPES:
            call(fn, shape)
    print(f"timed in one process, both compiled apart ({counters['stats']['unique_graphs']} graphs in all):")
    for shape in TIMED:
        rounds = interleave({k: (lambda fn=fn: call(fn, shape)) for k, fn in made.items()}, rounds=args.rounds,
                            block_s=1.0)
        (a, ra), (b, rb) = rounds.items()
        for label, r in rounds.items():
            e = estimate(r)
            print(f"  {shape[0]}x{shape[1]} {label}: {shape[0] / e.median:.1f} items/s "
                  f"[{shape[0] / e.hi:.1f}-{shape[0] / e.lo:.1f}]")
        ratio = paired(rb, ra)  # a's time over b's: b's speed over a's
        print(f"  {shape[0]}x{shape[1]} {b} / {a}: {ratio.median:.3f}x [{ratio.lo:.3f}-{ratio.hi:.3f}] round by round "
              f"({'a tie inside the noise' if ratio.lo <= 1 <= ratio.hi else 'beyond the noise'})")


if __name__ == "__main__":
    main()
