"""Text serving, one run: all-MiniLM-L6-v2 on real sentences nobody in this project wrote (the first sentences of the
Python standard library's docstrings), in interleaved rounds:

- torchship serving raw text: the bundle `torchship optimize zoo:minilm` chooses (or --bundle DIR), through
  POST /v1/embeddings: one sentence a request at concurrency 1 and 32, and 32 sentences a request. The bundle is
  built at batch sizes 1, 8 and 32 with 256 other docstrings as held-out data (timed at their lengths, so that the
  server cuts batches by measured costs) and 64 more as calibration data (int8 calibrated on the zoo's own sentences
  kept retrieval 0.97 there and 0.92 on docstrings), under `--budget` (default: the default budget; `retrieval=0.95` is what
  an embedding model's users need), over `--runtimes` and `--transforms` (default: all);
- sentence-transformers' offline `encode` (batch 32, sentences sorted by length, its best case), in fp32 and, where
  the CPU has native bf16, in bf16: what a user would run without a server;
- Infinity (`--infinity-python PATH`, a python whose venv has `infinity-emb[torch,server]`; its own venv, since it
  pins its own dependencies), torch engine, from the same model directory, through its /embeddings: the server a
  user would pick instead. Without the option its rows say why they are missing;
- the same bundle offline in this process (raw text in, batches of 32 sorted by length), and on the same 32s in
  arrival order, with sentence-transformers' encode on those 32s too: a server only ever sees what is in flight, so
  served / the bundle in arrival order is what the server costs, and served / encode in arrival order is served
  against a service of one's own that calls encode on what came in.

The served loads come from benchmarks/loadgen.c (a closed loop in C over the requests in turn; `--python-client` for
the httpx client of earlier runs), so the load takes little of the cores the servers run on.

Each figure is the median of the rounds with its range; ratios are taken within each round and summarized the same
way. Fidelity: the cosine of every sentence's served embedding to sentence-transformers' fp32 one, and over all the
sentences what embeddings are used for (the share of each sentence's 10 nearest neighbours kept, and the rank
correlation of all pairwise similarities; `torchship.similarity.retrieval`).

    python benchmarks/text_serving.py [--bundle DIR | --budget retrieval=0.95 --runtimes openvino --transforms int8,bf16]
                                      [--sentences 2000] [--duration 5] [--rounds 3]
                                      [--infinity-python /path/to/venv/bin/python] [--python-client]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

MODULES = ("os", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "asyncio", "typing",
           "string", "textwrap", "argparse", "logging", "email.message", "http.client", "urllib.parse", "unittest",
           "datetime", "decimal", "fractions", "statistics", "random", "shutil", "tempfile", "zipfile", "tarfile", "csv",
           "sqlite3", "xml.etree.ElementTree", "socket", "threading", "multiprocessing", "queue", "heapq", "bisect",
           "inspect", "dataclasses", "enum", "contextlib", "io", "codecs", "struct", "hashlib", "hmac", "secrets",
           "base64", "binascii", "gzip", "bz2", "lzma", "pickle", "copy", "pprint", "difflib", "locale", "gettext",
           "calendar", "time", "sched", "selectors", "signal", "mmap", "ssl", "smtplib", "imaplib", "ftplib", "uuid",
           "ipaddress", "html.parser", "configparser", "tomllib", "glob", "fnmatch", "filecmp", "operator", "math",
           "cmath", "numbers", "array", "weakref", "types", "abc", "traceback", "warnings", "doctest", "pdb", "timeit",
           "trace", "tracemalloc", "gc", "ast", "dis", "tokenize", "keyword", "platform", "sysconfig", "zlib")


def sentences(n: int) -> list[str]:
    """The first sentence of each docstring in the standard library modules above: deduplicated, 20 to 400
    characters, in a fixed order (shuffled with a fixed seed: arrival order mixes lengths as traffic does)."""
    found: set[str] = set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [mod, *vars(mod).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if not doc:
                continue
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0]
            if 20 <= len(first) <= 400:
                found.add(first)
    out = sorted(found)
    np.random.default_rng(0).shuffle(out)
    return out[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server process started here, ready when ``ready`` answers 200; stopped by its pid."""

    def __init__(self, args: list[str], ready: str, log: Path, env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited: {log.read_text()[-1500:]}")
            try:
                if httpx.get(ready, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"not ready in 300 s: {log.read_text()[-1500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Loadgen:
    """benchmarks/loadgen.c, compiled once: a closed loop in C over the given requests in turn, so the load takes
    little of the two cores the server runs on (the Python client took about a third of a core at 340 requests/s)."""

    def __init__(self, work: Path):
        self.exe, self.work = work / "loadgen", work
        subprocess.run(["cc", "-O2", "-o", str(self.exe), str(Path(__file__).with_name("loadgen.c")), "-lm"], check=True)

    def run(self, url: str, model: str, texts: list[str], per: int, concurrency: int, duration: float):
        """(sentences/s, p50 ms, p99 ms, errors) of ``concurrency`` connections sending ``per`` sentences a request."""
        parsed = httpx.URL(url)
        raw = b""
        for i in range(0, len(texts) - per + 1, per):
            body = json.dumps({"model": model, "input": texts[i:i + per]}).encode()
            raw += (f"POST {parsed.raw_path.decode()} HTTP/1.1\r\nHost: {parsed.host}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        path = self.work / f"requests-{per}.http"
        path.write_bytes(raw)
        done = subprocess.run([str(self.exe), parsed.host, str(parsed.port), str(path), "closed", str(concurrency),
                               str(duration)], capture_output=True, text=True, check=True)
        answers = [line.split() for line in done.stdout.splitlines() if line[:1].isdigit()]
        ok = np.array([float(us) for status, us in answers if status == "200"]) / 1e3
        errors = len(answers) - len(ok) + int(re.search(r"failed (\d+)", done.stdout)[1])
        return len(ok) * per / duration, float(np.percentile(ok, 50)), float(np.percentile(ok, 99)), errors


async def _load(url: str, body_of, texts: list[str], per: int, concurrency: int, duration: float):
    """Closed loop: ``concurrency`` clients, each sending ``per`` sentences a request, for ``duration`` seconds.
    (sentences/s, p50 ms, p99 ms, errors)."""
    latencies, done, errors = [], 0, 0
    stop = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def worker(k: int):
            nonlocal done, errors
            i = k * 9973
            while time.monotonic() < stop:
                batch = [texts[(i + j) % len(texts)] for j in range(per)]
                i += per * concurrency
                t = time.perf_counter()
                r = await client.post(url, json=body_of(batch))
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                done += per
        started = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.monotonic() - started
    lat = np.array(latencies) * 1e3
    return done / wall, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), errors


def served(url: str, model: str, texts: list[str]):
    """The three loads through OpenAI's /embeddings body (Infinity takes it too): from loadgen.c, or with
    --python-client from the httpx client of earlier runs."""
    if ARGS.python_client:
        body = lambda batch: {"model": model, "input": batch}  # noqa: E731
        return {f"c{c}x{per}": asyncio.run(_load(url, body, texts, per, c, ARGS.duration))
                for c, per in ((1, 1), (32, 1), (1, 32))}
    return {f"c{c}x{per}": LOADGEN.run(url, model, texts, per, c, ARGS.duration) for c, per in ((1, 1), (32, 1), (1, 32))}


def bundle_offline(loaded, texts: list[str], arrival: bool = False) -> float:
    """The bundle in this process, raw text in, batches of 32: sorted by length over all sentences, or with
    ``arrival`` in arrival order (what a server sees: the ceiling its serving aims at)."""
    order = texts if arrival else sorted(texts, key=len)
    loaded(order[:64])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(order), 32):
        loaded(order[i:i + 32])
    return len(order) / (time.perf_counter() - t)


def embed(url: str, model: str, texts: list[str]) -> np.ndarray:
    out = []
    for i in range(0, len(texts), 64):
        r = httpx.post(url, json={"model": model, "input": texts[i:i + 64]}, timeout=120)
        r.raise_for_status()
        out += [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    return np.array(out, dtype=np.float32)


def offline(st, texts: list[str], precision: str, arrival: bool = False) -> float:
    """sentence-transformers' encode, batches of 32: over all sentences sorted by length (its best case), or with
    ``arrival`` one call per 32 in arrival order, as a service of one's own would call it on what came in."""
    import torch
    order = texts if arrival else sorted(texts, key=len)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        st.encode(order[:64], batch_size=32)  # warm-up
        t = time.perf_counter()
        if arrival:
            for i in range(0, len(order), 32):
                st.encode(order[i:i + 32], batch_size=32)
        else:
            st.encode(order, batch_size=32)
    return len(order) / (time.perf_counter() - t)


def spread(values) -> str:
    v = sorted(values)
    return f"{np.median(v):,.1f} [{v[0]:,.1f}-{v[-1]:,.1f}]"


def main() -> None:
    from sentence_transformers import SentenceTransformer

    from torchship import OptimizeOptions, optimize
    from torchship.machine import cpu, native_bf16
    from torchship.zoo.minilm import model_dir
    global LOADGEN
    texts = sentences(ARGS.sentences)
    work = Path(tempfile.mkdtemp(prefix="text-serving-"))
    LOADGEN = None if ARGS.python_client else Loadgen(work)
    print(f"CPU: {cpu()[0]}; flags: {', '.join(sorted(f for f in cpu()[1] if f.startswith(('avx', 'amx'))))}")
    print(f"{len(texts)} sentences from the standard library's docstrings, mean {np.mean([len(t) for t in texts]):.0f} "
          "characters")
    bundle = ARGS.bundle
    if bundle is None:
        from anchors import docstrings

        from torchship import load_source
        from torchship.sources.hf import tokenize
        from torchship.verify import Budget
        tokenizer, docs = load_source("zoo:minilm").tokenizer, docstrings(256 + 64)
        held_out, calibration = tokenize(tokenizer, docs[:256], 128), tokenize(tokenizer, docs[256:], 128)
        opts = OptimizeOptions(batch_sizes=(1, 8, 32), budget=Budget.parse(ARGS.budget),
                               **({"runtimes": tuple(ARGS.runtimes.split(","))} if ARGS.runtimes else {}),
                               **({"transforms": tuple(ARGS.transforms.split(","))} if ARGS.transforms else {}))
        t = time.monotonic()
        result = optimize("zoo:minilm", opts, dims={"seq": 128}, eval_data=held_out, calibration_data=calibration,
                          out=work / "minilm")
        bundle = result.bundle
        print(f"optimize zoo:minilm (budget {ARGS.budget or 'default'}, runtimes {ARGS.runtimes or 'all'}, transforms "
              f"{ARGS.transforms or 'all'}): {result.message} ({time.monotonic() - t:.0f} s)")
    st = SentenceTransformer(str(model_dir()), device="cpu")
    reference = st.encode(texts, batch_size=32)
    port = free_port()
    ours = Proc([sys.executable, "-m", "torchship.cli", "serve", str(bundle), "--port", str(port)],
                f"http://127.0.0.1:{port}/v2/health/ready", work / "torchship.log")
    try:
        got = embed(f"http://127.0.0.1:{port}/v1/embeddings", "minilm", texts)
    finally:
        ours.stop()
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    from torchship.similarity import retrieval
    kept, rho = retrieval(reference, got)
    print(f"fidelity: cosine of torchship's served embeddings to sentence-transformers fp32: min {cos.min():.6f}, "
          f"median {np.median(cos):.6f} over {len(texts)} sentences; nearest 10 neighbours kept {kept:.4f}, rank "
          f"correlation of the pairwise similarities {rho:.4f}")
    precisions = ["fp32"] + (["bf16"] if native_bf16() else [])
    rows: dict[str, list] = {}
    from torchship import load_bundle
    for r in range(ARGS.rounds):
        order = ["torchship", "st", "infinity", "bundle"]
        order = order[r % 4:] + order[:r % 4]
        for who in order:
            if who == "bundle":
                loaded = load_bundle(bundle, trust_code=True)  # built by this run (or given by the user)
                rows.setdefault("torchship bundle offline (batch 32, sorted)", []).append(bundle_offline(loaded, texts))
                rows.setdefault("torchship bundle offline (batch 32, arrival order)", []).append(
                    bundle_offline(loaded, texts, arrival=True))
                del loaded
            elif who == "st":
                for p in precisions:
                    rows.setdefault(f"sentence-transformers encode {p} (offline)", []).append(offline(st, texts, p))
                rows.setdefault(f"sentence-transformers encode {precisions[-1]} (32 in arrival order)", []).append(
                    offline(st, texts, precisions[-1], arrival=True))
            elif who == "torchship":
                s = Proc([sys.executable, "-m", "torchship.cli", "serve", str(bundle), "--port", str(port)],
                         f"http://127.0.0.1:{port}/v2/health/ready", work / "torchship.log")
                try:
                    for k, v in served(f"http://127.0.0.1:{port}/v1/embeddings", "minilm", texts).items():
                        rows.setdefault(f"torchship {k}", []).append(v)
                finally:
                    s.stop()
            elif ARGS.infinity_python:
                p2 = free_port()
                s = Proc([ARGS.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", str(model_dir()),
                          "--engine", "torch", "--device", "cpu", "--port", str(p2), "--served-model-name", "minilm"],
                         f"http://127.0.0.1:{p2}/health", work / "infinity.log", {"INFINITY_ANONYMOUS_USAGE_STATS": "0"})
                try:
                    for k, v in served(f"http://127.0.0.1:{p2}/embeddings", "minilm", texts).items():
                        rows.setdefault(f"infinity {k}", []).append(v)
                finally:
                    s.stop()
    print(f"\n{ARGS.rounds} rounds of {ARGS.duration:g} s per load; median [range] over the rounds; c = concurrency, "
          "x = sentences a request")
    for name, values in rows.items():
        if isinstance(values[0], tuple):
            print(f"  {name:44s} {spread([v[0] for v in values])} sentences/s, p50 {spread([v[1] for v in values])} ms, "
                  f"p99 {spread([v[2] for v in values])} ms, errors {sum(v[3] for v in values)}")
        else:
            print(f"  {name:44s} {spread(values)} sentences/s")
    if not ARGS.infinity_python:
        print("  infinity: not run (give --infinity-python, a venv with infinity-emb[torch,server])")
    best_st = max((k for k in rows if k.startswith("sentence-transformers") and k.endswith("(offline)")),
                  key=lambda k: np.median(rows[k]))
    ours32 = [v[0] for v in rows["torchship c32x1"]]
    print(f"\ntorchship c32x1 / {best_st}: {spread([a / b for a, b in zip(ours32, rows[best_st])])} (goal >= 1.5)")
    batched = [v[0] for v in rows["torchship c1x32"]]
    print(f"torchship c1x32 / {best_st}: {spread([a / b for a, b in zip(batched, rows[best_st])])}")
    own = rows["torchship bundle offline (batch 32, sorted)"]
    print(f"torchship c32x1 / the same bundle offline: {spread([a / b for a, b in zip(ours32, own)])}")
    print(f"the bundle offline / {best_st}: {spread([a / b for a, b in zip(own, rows[best_st])])}")
    arrived = rows["torchship bundle offline (batch 32, arrival order)"]
    st_arrived = rows[f"sentence-transformers encode {precisions[-1]} (32 in arrival order)"]
    print(f"torchship c32x1 / the bundle on the same 32s in arrival order: "
          f"{spread([a / b for a, b in zip(ours32, arrived)])} (what the server costs)")
    print(f"torchship c32x1 / sentence-transformers {precisions[-1]} on 32s in arrival order: "
          f"{spread([a / b for a, b in zip(ours32, st_arrived)])} (served against a service of one's own on encode)")
    if "infinity c32x1" in rows:
        theirs = [v[0] for v in rows["infinity c32x1"]]
        print(f"torchship c32x1 / infinity c32x1: {spread([a / b for a, b in zip(ours32, theirs)])} (goal >= 5)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--infinity-python", default=None)
    parser.add_argument("--budget", default=None, help="for the bundle this run builds, as optimize --budget")
    parser.add_argument("--runtimes", default=None, help="for the bundle this run builds, comma-separated")
    parser.add_argument("--transforms", default=None, help="for the bundle this run builds, comma-separated")
    parser.add_argument("--python-client", action="store_true", help="load from Python (httpx) instead of loadgen.c")
    ARGS = parser.parse_args()
    main()
