"""Is torchship's choice at least as fast as what a user would pick by hand? One run, in one process, interleaved:
eager fp32, torchship's chosen bundle, and the anchors (OpenVINO at its default hint and at f32, ONNX Runtime fp32 at
its defaults, torch bf16 autocast), on MiniLM and digits-cnn (batch 1 and batch 32). Prints items/s with the interval,
the ratio to eager and the lowest per-item cosine to eager fp32.

MiniLM runs two workloads at batch 32: every item padded to seq 128 (``optimize --lengths seq=128``), and text at the
lengths users send: the first paragraphs of the Python standard library's docstrings (text nobody here wrote), 8
batches of 32, each padded to its longest as a server pads a batch; torchship's choice for it is made with those
docstrings as its held-out data (another 256 of them), so the search times the contenders at their lengths
(``torchship.mix``). Each anchor runs the same padded batches; torchship's bundle runs them as it serves them.

Goals: torchship's choice at least as fast as the fastest anchor on each row among those within its fidelity budget
(cosine >= 0.999), a tie inside the noise counting as met; on MiniLM, at least 5x eager at cosine >= 0.999 on a CPU
with AMX. On a CPU without native bf16 the bf16 rows are absent, and the script says why.

    python benchmarks/anchors.py [--models minilm,digits-cnn]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from torchship import OptimizeOptions, load_bundle, load_source, optimize
from torchship.machine import NO_BF16, cpu, native_bf16
from torchship.measure import estimate, faster, interleave

BUDGET = 0.999


def min_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    a, b = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)).min())


def docstrings(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct first paragraphs of the docstrings of the standard library's public functions and classes."""
    import importlib
    import inspect
    import random
    names = ("argparse asyncio base64 bisect calendar collections configparser contextlib copy csv dataclasses datetime "
             "decimal difflib email enum fnmatch fractions functools glob gzip hashlib heapq hmac html.parser "
             "http.client inspect ipaddress itertools json logging math mimetypes operator os pathlib pickle pprint "
             "queue random re secrets shlex shutil socket sqlite3 statistics string struct subprocess tarfile tempfile "
             "textwrap threading time timeit traceback typing unicodedata unittest urllib.parse uuid warnings weakref "
             "xml.dom.minidom zipfile zlib").split()
    found: dict[str, None] = {}
    for name in names:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first) > 10:
                found[first] = None
    texts = sorted(found)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def anchors(model, feeds: dict, work: Path) -> dict:
    """name -> a function of the feeds returning the first output, as a user would set each one up by hand."""
    import onnxruntime as ort
    import openvino as ov
    args = tuple(torch.from_numpy(feeds[n]) for n in model.spec.input_names)
    module = model.module.eval()
    out = {}

    def eager(f):
        with torch.inference_mode():
            return module(*(torch.from_numpy(f[n]) for n in model.spec.input_names))[0].numpy()
    out["eager fp32"] = eager
    core = ov.Core()
    ov_model = ov.convert_model(module, example_input=args)
    for label, config in (("OpenVINO default hint", {}), ("OpenVINO f32", {"INFERENCE_PRECISION_HINT": "f32"})):
        compiled = core.compile_model(ov_model, "CPU", config)
        out[label] = lambda f, c=compiled: c([f[n] for n in model.spec.input_names])[0]
    path = work / f"{model.name}.onnx"
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in model.spec.inputs}
    torch.onnx.export(module, args, str(path), dynamo=False, input_names=model.spec.input_names, dynamic_axes=axes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out["ONNX Runtime fp32"] = lambda f: session.run(None, {n: f[n] for n in model.spec.input_names})[0]
    if native_bf16():
        def autocast(f):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return module(*(torch.from_numpy(f[n]) for n in model.spec.input_names))[0].float().numpy()
        out["torch bf16 autocast"] = autocast
    return out


def row(source: str, batch: int, dims: dict, work: list[dict], out: Path, label: str = "", **kw) -> None:
    """``work``: the batches of one workload (one call runs them all); ``kw``: optimize's own options for it."""
    model = load_source(source, dims=dims)
    eval_data = kw.pop("eval_data", None)
    res = optimize(source, OptimizeOptions(batch_sizes=(batch,), **kw), dims=dims, eval_data=eval_data,
                   out=out / f"{model.name}-{batch}-{len(list(out.iterdir()))}")
    bundle = load_bundle(res.bundle, trust_code=True)
    first = model.spec.output_names[0]
    fns = {**anchors(model, work[0], out), f"torchship ({res.chosen.name})": lambda f: bundle(f)[first]}
    ref = [fns["eager fp32"](f) for f in work]
    cos = {name: min(min_cosine(r, fn(f)) for r, f in zip(ref, work)) for name, fn in fns.items()}
    items = batch * len(work)
    times = {name: estimate(r) for name, r in interleave({n: (lambda fn=fn: [fn(f) for f in work]) for n, fn in fns.items()},
                                                         rounds=5, block_s=0.3 * len(work), min_runs=2, warmup=2).items()}
    eager = times["eager fp32"].median
    print(f"\n{model.name}, batch {batch}" + (f", {label}" if label else f", {dims}" if dims else "") + f": {res.message}"
          + (f"; timed on {res.mix.describe()}" if res.mix else ""))
    print(f"  {'':<34}{'items/s':>12}  {'interval':<22}{'vs eager':>9}{'min cosine':>12}")
    for name, e in times.items():
        rate, slow, fast = e.rate(items)  # items a call: every batch of the workload
        print(f"  {name:<34}{rate:>12,.1f}  [{slow:,.1f}-{fast:,.1f}]{'':<4}{eager / e.median:>8.2f}x{cos[name]:>12.6f}")
    ours = times[f"torchship ({res.chosen.name})"]
    faithful = {n: e for n, e in times.items() if not n.startswith("torchship") and cos[n] >= BUDGET}
    best = min(faithful, key=lambda n: faithful[n].median)
    verdict = ("met" if ours.median <= faithful[best].median else "met (a tie inside the noise)"
               if not faster(faithful[best], ours) else "NOT met")
    print(f"  goal: torchship at least as fast as the fastest anchor within budget ({best}): "
          f"{faithful[best].median / ours.median:.2f}x of it, {verdict}")
    if model.name == "minilm":
        amx = "amx_bf16" in cpu()[1]
        ratio = eager / ours.median
        print(f"  goal on a CPU with AMX: >= 5x eager at cosine >= {BUDGET}: {ratio:.2f}x at {cos[f'torchship ({res.chosen.name})']:.6f}"
              + ("" if amx else " (this CPU has no AMX: the goal does not apply here)"))


def padded(feeds: dict) -> dict:
    """A batch cut to its longest item, as a server pads a batch (not to the model's maximum)."""
    longest = int(feeds["attention_mask"].sum(1).max())
    return {k: np.ascontiguousarray(v[:, :longest]) for k, v in feeds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,digits-cnn")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchship-anchors-"))
    name, flags = cpu()
    print(f"CPU {name}; {', '.join(f for f in ('avx512_bf16', 'amx_bf16', 'amx_int8', 'avx512_vnni') if f in flags)}")
    if not native_bf16():
        print(f"torch bf16 autocast is absent: {NO_BF16}")
    for model in args.models.split(","):
        if model == "minilm":
            from torchship.sources.hf import tokenize
            from torchship.zoo.minilm import sentences
            m = load_source("zoo:minilm")
            row("zoo:minilm", 32, {"seq": 128}, [tokenize(m.tokenizer, sentences(32, seed=3), 128)], work,
                "every item padded to seq 128", lengths={"seq": (128,)})
            texts = docstrings(256 + 8 * 32)
            held_out = tokenize(m.tokenizer, texts[:256], 128)
            served = [padded(tokenize(m.tokenizer, texts[256 + 32 * i:256 + 32 * (i + 1)], 128)) for i in range(8)]
            tokens = np.concatenate([f["attention_mask"].sum(1) for f in served])
            print(f"\ndocstrings: {len(texts)} from the standard library; the 256 served: {tokens.mean():.1f} tokens on "
                  f"average, {np.percentile(tokens, 50):.0f} median, {np.percentile(tokens, 90):.0f} at the 90th percentile, "
                  f"{(tokens < 40).mean():.0%} under 40")
            row("zoo:minilm", 32, {"seq": 128}, served, work, "standard library docstrings, 8 batches each padded to "
                "its longest", eval_data=held_out)
        else:
            from torchship.zoo.digits import dataset
            x = dataset()["test"][0]
            for batch in (1, 32):
                row("zoo:digits-cnn", batch, {}, [{"image": x[:batch]}], work)


if __name__ == "__main__":
    main()
