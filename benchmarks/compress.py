"""Compression figures from one run.

MiniLM (all-MiniLM-L6-v2, mean-pooled sentence embeddings, seq 128, batch 32): every int8 variant's throughput
as a ratio to fp32 eager, and the cosine similarity of its embeddings to fp32 over held-out varied sentences that
calibration never saw (goal: one variant >= 1.5x with cosine >= 0.99).

digits-cnn: 50% structured channel pruning (Torch-Pruning's dependency graph) followed by fine-tuning through the
trainer: accuracy drop (goal <= 1 point), size ratio and throughput ratio against the unpruned model (goal: faster);
then the trained variants inside one `optimize --train-data` run (QAT, channel pruning, a distilled student).

    python benchmarks/compress.py [--sentences 256] [--skip-minilm] [--skip-digits]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def minilm(n_sentences: int) -> None:
    from torchship import Budget, OptimizeOptions, optimize
    from torchship import load_source
    from torchship.sources.hf import tokenize
    from torchship.zoo import minilm as zoo
    model = load_source("zoo:minilm")
    seen = set(zoo.sentences(64 + 64))  # the zoo's own verification and calibration sentences
    held_out = [s for s in zoo.sentences(n_sentences + 200, seed=11) if s not in seen][:n_sentences]
    work = Path(tempfile.mkdtemp(prefix="torchship-compress-"))
    np.savez(work / "eval.npz", **tokenize(model.tokenizer, held_out, 128))
    res = optimize("zoo:minilm", OptimizeOptions(runtimes=("eager", "compile", "aoti", "onnxrt"), transforms=("int8",),
                                                 batch_sizes=(32,), seconds_per_size=3.0, budget=Budget(min_cosine=0.99),
                                                 exhaustive=True),  # every variant, whatever the search would skip
                   eval_data=work / "eval.npz")
    rows = {v.name: v for v in res.variants}
    base = rows["eager"].throughput(32)
    print(f"MiniLM, seq 128, batch 32, {len(held_out)} held-out sentences; fp32 eager {base:.1f} items/s")
    best = None
    for name, v in rows.items():
        quantized = v.transforms or v.options.get("quantize")
        if not quantized and name not in ("onnxrt", "compile", "aoti"):
            continue
        if v.status not in ("ok", "rejected"):
            print(f"  {name:20s} {v.status}: {v.reason[:110]}")
            continue
        ratio, cos = v.throughput(32) / base, v.fidelity.cosine
        print(f"  {name:20s} {ratio:5.2f}x fp32 eager   cosine {cos:.4f} (min {v.fidelity.cosine_min:.4f})"
              f"   {v.artifact_bytes / 2**20:6.1f} MB{'' if quantized else '   (fp32)'}")
        if quantized and cos >= 0.99 and (best is None or ratio > best[1]):
            best = (name, ratio, cos)
    if best:
        print(f"  best int8 with cosine >= 0.99: {best[0]} at {best[1]:.2f}x (goal >= 1.5x): "
              f"{'met' if best[1] >= 1.5 else 'not met'}")
    else:
        print("  no int8 variant kept cosine >= 0.99 (goal not met)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    args = p.parse_args()
    if not args.skip_minilm:
        minilm(args.sentences)
    if not args.skip_digits:
        digits()
        searched()


def digits(amount: float = 0.5) -> None:
    import torch

    from torchship.profile import median_s
    from torchship.runtimes._torch import TorchRunner
    from torchship.sources import load_source
    from torchship.train import TrainConfig, train
    from torchship.zoo.digits import dataset
    base = load_source("zoo:digits-cnn")
    run = train("zoo:digits-cnn", "zoo:digits", TrainConfig(epochs=8, lr=1e-3, patience=None, prune_channels=amount,
                                                           progress=False))
    x, y = dataset()["test"]
    with torch.inference_mode():
        acc = [float((m(torch.from_numpy(x))[0].argmax(1).numpy() == y).mean()) for m in (base.module, run.model)]
    size = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in (base.module, run.model)]
    feeds = {"image": x[:32]}
    speed = [32 / (median_s(TorchRunner(m.eval(), base.spec), feeds, seconds=2.0)) for m in (base.module, run.model)]
    print(f"digits-cnn, {amount:.0%} structured channel pruning (Torch-Pruning) + {run.summary['epochs_run']} epochs of "
          f"fine-tuning ({run.summary['seconds']:.1f}s): test accuracy {acc[1]:.2%} against {acc[0]:.2%} unpruned "
          f"(drop {100 * (acc[0] - acc[1]):+.2f} points; goal <= 1)")
    print(f"  parameters {run.summary['parameters_after']:,} of {run.summary['parameters_before']:,}; size ratio "
          f"{size[1] / size[0]:.2f}; eager throughput at batch 32 {speed[1]:,.0f} against {speed[0]:,.0f} items/s = "
          f"{speed[1] / speed[0]:.2f}x (goal > 1)")


def searched() -> None:
    """The same kinds inside one optimize run with --train-data: what each trained variant bought on its runtime."""
    from torchship import Budget, OptimizeOptions, optimize
    from torchship.report import bought
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("aoti", "onnxrt"), batch_sizes=(32,), seconds_per_size=1.0,
                                                     exhaustive=True,
                                                     transforms=("qat", "channels", "distill"),
                                                     budget=Budget(max_accuracy_drop=0.01)), train_data="zoo:digits")
    print(f"digits-cnn, optimize --train-data zoo:digits --budget accuracy_drop=0.01 (batch 32): {res.message}")
    for line in bought(res)[2:-1]:
        print("  " + line.replace("**", ""))


if __name__ == "__main__":
    main()
