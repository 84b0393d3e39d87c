"""Which models optimize, on which runtimes, and whether what verifies is right on inputs verification never saw.

Models: small random-config Hugging Face directories (BERT, DistilBERT, a T5 encoder, GPT-2 with its LM head, ViT,
ResNet, Wav2Vec2), saved here, and plain modules given as module:attr (an LSTM, a loop on a tensor's value, a
50-row embedding). Each runtime is optimized on its own and bundled; every bundle that verified is then run on
fresh inputs (other batch and sequence sizes, other values) and compared with eager. Prints a table of model x
runtime: verified (and its relative error on the fresh inputs), rejected or skipped (the reason), and the choice
when all runtimes compete. Goals: every verified variant within 2% of eager on the fresh inputs; every listed
Hugging Face task optimizes from its directory.

    python benchmarks/coverage.py [--runtimes eager,torchscript,aoti,onnxrt,openvino]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.models: the plain modules

from torchship import OptimizeOptions, load_bundle, load_source, optimize  # noqa: E402
from torchship.verify import relative_error  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def hf_dirs(root: Path) -> dict[str, str]:
    import transformers as tf
    torch.manual_seed(0)
    made = {
        "bert": tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64, **SMALL)),
        "distilbert": tf.DistilBertModel(tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                             max_position_embeddings=64)),
        "t5-encoder": tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)),
        "gpt2-lm": tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
        "vit": tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, num_labels=5, **SMALL)),
        "resnet": tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                                  num_labels=4)),
        "wav2vec2": tf.Wav2Vec2Model(tf.Wav2Vec2Config(conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8),
                                                       num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                                                       vocab_size=10, **SMALL)),
    }
    for name, model in made.items():
        model.eval().save_pretrained(root / name)
    return {name: str(root / name) for name in made}


MODULES = {"lstm": "tests.models:Lstm", "value-loop": "tests.models:ValueLoop", "small-vocab": "tests.models:SmallVocab"}
DIMS = {"samples": 4000, "seq": 32}


def fresh_error(source: str, bundle: Path) -> float:
    """The bundle against eager on inputs no verification saw: batch 3, other sequence sizes, other values."""
    model = load_source(source, dims=DIMS)
    worst = 0.0
    for seed, scale in ((11, 1.0), (12, 1.7)):
        dims = {s: max(2, n // 2 + seed % 5) for s, n in model.dims.items()}
        feeds = model.spec.sample(3, dims, seed=seed)
        feeds = {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}
        with torch.inference_mode():
            want = dict(zip(model.spec.output_names, (t.numpy() for t in model.module(
                *(torch.from_numpy(feeds[n]) for n in model.spec.input_names)))))
        worst = max(worst, relative_error(want, load_bundle(bundle, trust_code=True)(feeds)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtimes", default="eager,torchscript,aoti,onnxrt,openvino")
    args = p.parse_args()
    runtimes = args.runtimes.split(",")
    work = Path(tempfile.mkdtemp(prefix="torchship-coverage-"))
    sources = {**hf_dirs(work / "hf"), **MODULES}
    bad, hf_fails = 0, 0
    print(f"{'model':<13}" + "".join(f"{r:<26}" for r in runtimes) + "chosen")
    for name, source in sources.items():
        (work / name).mkdir()
        cells = []
        for r in runtimes:
            try:
                res = optimize(source, OptimizeOptions(runtimes=(r,), transforms=(), batch_sizes=(2,), seconds_per_size=0.05,
                                                       exhaustive=True), dims=DIMS, out=work / name / r)
                v = res.variant(r)
            except Exception as exc:  # the source itself: the whole row
                cells.append(f"source: {str(exc)[:60]}")
                hf_fails += source.startswith(str(work))  # a Hugging Face directory that did not load
                continue
            if v.ok:
                e = fresh_error(source, res.bundle)
                bad += e > 0.02
                cells.append(f"verified, fresh {e:.1e}")
            else:
                cells.append(f"{v.status}: {v.reason[:40]}")
        try:
            chosen = optimize(source, OptimizeOptions(runtimes=tuple(runtimes), transforms=(), batch_sizes=(2,),
                                                      seconds_per_size=0.05), dims=DIMS).message
        except Exception as exc:
            chosen = f"failed: {str(exc)[:60]}"
        print(f"{name:<13}" + "".join(f"{c[:25]:<26}" for c in cells) + chosen)
    print(f"\nverified variants off by more than 2% on fresh inputs: {bad} (goal 0); Hugging Face directories that did not "
          f"load: {hf_fails} of 7 (goal 0)")


if __name__ == "__main__":
    main()
