"""Figures for `torchship optimize`, from one run: for digits-cnn and MiniLM (seq 128), each variant's
throughput as a ratio to eager and as a fraction of the machine's limit (model FLOPs x items/s over a
measured fp32 matrix-multiply rate). Figures, not pass/fail.

    python benchmarks/optimize.py [--models digits-cnn,minilm] [--batch-sizes 1,8,32] [--seconds 1.0]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchship import OptimizeOptions, load_source, optimize
from torchship.runtimes._torch import example_args


def _best(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(threads: int, n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Best observed fp32 GEMM rate in FLOP/s with ``threads`` threads, through torch and through ONNX Runtime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = {"torch": 2 * n**3 / _best(lambda: a @ b, repeats)}
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": b.numpy()}
    rates["onnxruntime"] = 2 * n**3 / _best(lambda: sess.run(None, feeds), repeats)
    return rates


def flops_per_item(source: str, dims: dict) -> float:
    model = load_source(source, dims=dims)
    args = example_args(model, 1)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.module(*args)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-cnn,minilm")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--seconds", type=float, default=1.0)
    args = p.parse_args()
    threads = os.cpu_count()
    rates = matmul_rate(threads)
    peak = max(rates.values())
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    print(f"machine: {threads} threads; fp32 2048x2048 matmul, best of 10: "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()) + f"; limit taken as {peak / 1e9:.1f}")
    for name in args.models.split(","):
        dims = {"seq": 128} if name == "minilm" else {}
        flops = flops_per_item(f"zoo:{name}", dims)
        res = optimize(f"zoo:{name}", OptimizeOptions(batch_sizes=sizes, seconds_per_size=args.seconds, exhaustive=True), dims=dims)
        print(f"\n{name}{' (seq 128)' if dims else ''}: {flops / 1e6:.2f} MFLOP per item; {res.message}")
        print(f"{'variant':<13}{'status':<10}" + "".join(f"{'bs ' + str(b) + ' x eager':>16}{'% of peak':>11}" for b in sizes))
        eager = res.variant("eager")
        for v in res.variants:
            cells = ""
            for b in sizes:
                s, e = v.throughput(b), eager.throughput(b)
                if s and e:
                    cells += f"{s / e:>15.2f}x{100 * flops * s / peak:>10.1f}%"
                else:
                    cells += f"{'-':>16}{'-':>11}"
            print(f"{v.name:<13}{v.status:<10}{cells}" + (f"  ({v.reason})" if v.reason else ""))


if __name__ == "__main__":
    main()
