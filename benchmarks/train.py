"""Training figures from one run (digits-cnn, 2 CPU cores): test accuracy and time of the default recipe (what
`torchship train zoo:digits-cnn --data zoo:digits` does with no other flag), the same in bf16 autocast (why fp32 is
the CPU default), a half-width student distilled from it, a 2-process DDP run on gloo against the single process,
and an int8 model from quantization-aware training against fp32.

    python benchmarks/train.py
"""
from __future__ import annotations

import time

from torchship.train import TrainConfig, train


def main() -> None:
    cfg = dict(progress=False)  # the defaults
    t0 = time.perf_counter()
    teacher = train("zoo:digits-cnn", "zoo:digits", TrainConfig(**cfg))
    wall = time.perf_counter() - t0
    acc = teacher.summary["test"]["test_acc"]
    print(f"digits-cnn, default recipe: test accuracy {acc:.2%} after {teacher.summary['epochs_run']} epochs; fit "
          f"{teacher.summary['seconds']:.1f}s, {wall:.1f}s with data and evaluation (goal >= 97% in < 60 s); precision "
          f"{teacher.summary['recipe']['precision']}")
    bf16 = train("zoo:digits-cnn", "zoo:digits", TrainConfig(precision="bf16-mixed", **cfg)).summary
    print(f"  the same in bf16-mixed: {bf16['test']['test_acc']:.2%} after {bf16['epochs_run']} epochs, fit {bf16['seconds']:.1f}s")
    student = train("torchship.zoo.digits:student", "zoo:digits", TrainConfig(**cfg), teacher=teacher.model)
    s_acc = student.summary["test"]["test_acc"]
    plain = train("torchship.zoo.digits:student", "zoo:digits", TrainConfig(**cfg)).summary["test"]["test_acc"]
    print(f"half-width student: distilled {s_acc:.2%} (teacher {acc:.2%}, gap {100 * (acc - s_acc):+.2f} points; goal <= 1.5), "
          f"trained alone {plain:.2%}")
    ddp = train("zoo:digits-cnn", "zoo:digits", TrainConfig(devices=2, strategy="ddp", **cfg))
    d_acc = ddp.summary["test"]["test_acc"]
    print(f"2-process DDP (gloo): {d_acc:.2%} against single-process {acc:.2%} ({100 * (d_acc - acc):+.2f} points; goal within 1); "
          f"fit {ddp.summary['seconds']:.1f}s")
    qat = train(teacher.model, "zoo:digits", TrainConfig(epochs=3, lr=1e-4, patience=None, qat=True, progress=False))
    q_acc = qat.summary["test"]["test_acc_int8"]
    print(f"QAT (torchao PT2E, x86 inductor quantizer), 3 epochs from the fp32 model: int8 {q_acc:.2%} against fp32 "
          f"{acc:.2%} ({100 * (q_acc - acc):+.2f} points; goal within 1); fit {qat.summary['seconds']:.1f}s")


if __name__ == "__main__":
    main()
