"""Image serving, one run: a vision classifier served from encoded image files (JPEG bytes, Triton's binary BYTES)
against the same bundle offline on the same files (`load_bundle(b)(files)`: decoding and preprocessing included), in
interleaved rounds. The images are crops of the photographs scikit-learn ships (china.jpg, flower.jpg), re-encoded
as JPEG at sizes from 160 to 427 pixels: real photographs nobody in this project made. The model is a ViT at 224x224
(random weights from a config, with ViT's image processor and ten labels): what is measured is the serving path, so
its weights do not matter. Issue 30's goal: served at least 0.8 of offline.

    python benchmarks/image_serving.py [--rounds 3] [--duration 5] [--concurrency 16] [--images 64]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from text_serving import Proc, free_port, spread  # noqa: E402


def photos(n: int) -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_sample_images
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = rng.integers(160, 428), rng.integers(160, 428)
        x, y = rng.integers(0, img.width - min(w, img.width) + 1), rng.integers(0, img.height - min(h, img.height) + 1)
        buf = io.BytesIO()
        img.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def model_dir(folder: Path) -> Path:
    import torch
    import transformers as tf
    torch.manual_seed(0)
    labels = [f"class {i}" for i in range(10)]
    cfg = tf.ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                       intermediate_size=768, num_labels=10, id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    tf.ViTForImageClassification(cfg).eval().save_pretrained(folder)
    tf.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def offline(bundle, files: list[bytes], batch: int, seconds: float) -> float:
    done, stop, i = 0, time.monotonic() + seconds, 0
    started = time.monotonic()
    while time.monotonic() < stop:
        part = [files[(i + j) % len(files)] for j in range(batch)]
        bundle(part)
        done += batch
        i += batch
    return done / (time.monotonic() - started)


def request(image: bytes) -> tuple[bytes, dict]:
    raw = struct.pack("<I", len(image)) + image
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "label"}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


async def served(url: str, files: list[bytes], concurrency: int, seconds: float) -> tuple[float, float, int]:
    bodies = [request(f) for f in files]
    done, errors, latencies = 0, 0, []
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=60) as client:
        async def worker(k: int):
            nonlocal done, errors
            i = k
            while time.monotonic() < stop:
                body, headers = bodies[i % len(bodies)]
                i += concurrency
                t = time.perf_counter()
                r = await client.post(url, content=body, headers=headers)
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                done += 1
        started = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.monotonic() - started
    return done / wall, float(np.percentile(np.array(latencies) * 1e3, 99)), errors


def main() -> None:
    from torchship import OptimizeOptions, load_bundle, optimize
    from torchship.machine import cpu
    work = Path(tempfile.mkdtemp(prefix="image-serving-"))
    print(f"CPU: {cpu()[0]}; flags: {', '.join(sorted(f for f in cpu()[1] if f.startswith(('avx', 'amx'))))}")
    files = photos(ARGS.images)
    print(f"{len(files)} JPEG crops of scikit-learn's sample photographs, {np.mean([len(f) for f in files]) / 1024:.0f} KB "
          "on average")
    t = time.monotonic()
    result = optimize(model_dir(work / "vit"), OptimizeOptions(batch_sizes=(1, ARGS.concurrency), transforms=()),
                      out=work / "bundle", name="vit")
    print(f"optimize: {result.message} ({time.monotonic() - t:.0f} s); processing check passed: "
          f"{result.processing.check.passed if result.processing and result.processing.check else None}")
    bundle = load_bundle(result.bundle, trust_code=True)
    port = free_port()
    rows: dict[str, list] = {"offline": [], "served": []}
    for r in range(ARGS.rounds):
        for who in (("offline", "served") if r % 2 == 0 else ("served", "offline")):
            if who == "offline":
                rows["offline"].append(offline(bundle, files, ARGS.concurrency, ARGS.duration))
            else:
                s = Proc([sys.executable, "-m", "torchship.cli", "serve", str(result.bundle), "--port", str(port),
                          "--trust-code"], f"http://127.0.0.1:{port}/v2/health/ready", work / "serve.log")
                try:
                    rows["served"].append(asyncio.run(served(f"http://127.0.0.1:{port}/v2/models/vit/infer", files,
                                                             ARGS.concurrency, ARGS.duration)))
                finally:
                    s.stop()
    print(f"\n{ARGS.rounds} rounds of {ARGS.duration:g} s; median [range] over the rounds")
    print(f"  offline, batches of {ARGS.concurrency} files (decode + preprocess + run): {spread(rows['offline'])} images/s")
    print(f"  served, one image a request at concurrency {ARGS.concurrency}: {spread([v[0] for v in rows['served']])} "
          f"images/s, p99 {spread([v[1] for v in rows['served']])} ms, errors {sum(v[2] for v in rows['served'])}")
    ratios = sorted(s[0] / o for s, o in zip(rows["served"], rows["offline"]))
    print(f"served / offline, per round: {np.median(ratios):.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}] (goal >= 0.8)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--images", type=int, default=64)
    ARGS = parser.parse_args()
    main()
