"""Where to cut a padded batch of text: by the bundle's measured costs, or by the 25% padding rule? One run, one
process, interleaved, on text nobody here wrote (the first paragraphs of the Python standard library's docstrings).

A MiniLM bundle is made with ``--runtimes openvino`` at batch sizes 1, 8 and 32, with 256 docstrings as its held-out
data (so it is timed at their lengths, and its manifest keeps a batch's cost at each length and each batch size).
Then 512 other docstrings arrive in batches of 32 in arrival order, each padded to its longest, and the bundle's
runner answers each batch three ways: as one padded call; cut by the 25% padding rule (``processing.lengths.runs``,
what a bundle timed at one length or one batch size does); cut where the calls' costs, estimated from the manifest,
add up to least (``processing.lengths.priced``, what the server and the Python API now do). Prints items/s with the
interval over rounds, the ratio to one padded call, the calls made and the padded tokens computed. Goal: the measured
cuts at least as fast as the 25% rule (a tie inside the noise counts).

    python benchmarks/cuts.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from anchors import docstrings  # noqa: E402

from torchship import OptimizeOptions, load_bundle, load_source, optimize  # noqa: E402
from torchship.measure import estimate, faster, interleave  # noqa: E402
from torchship.processing.lengths import by_length  # noqa: E402
from torchship.sources.hf import tokenize  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="torchship-cuts-"))
    model = load_source("zoo:minilm", dims={"seq": 128})
    texts = docstrings(256 + 512)
    held_out = tokenize(model.tokenizer, texts[:256], 128)
    res = optimize("zoo:minilm", OptimizeOptions(runtimes=("openvino",), transforms=("bf16",), batch_sizes=(1, 8, 32)),
                   dims={"seq": 128}, eval_data=held_out, out=work / "bundle")
    bundle = load_bundle(res.bundle)
    m = bundle.manifest
    print(f"bundle: {res.message}; timed on {res.mix.describe() if res.mix else 'the example only'}")
    price = m.pricer()
    if price is None:
        print("the manifest has no costs at several lengths and batch sizes: nothing to compare")
        return
    batches = []
    for i in range(16):
        feeds = tokenize(model.tokenizer, texts[256 + 32 * i:256 + 32 * (i + 1)], 128)
        longest = int(feeds["attention_mask"].sum(1).max())
        batches.append({k: np.ascontiguousarray(v[:, :longest]) for k, v in feeds.items()})
    calls: dict[str, list] = {}

    def counted(name):
        def run(feeds):
            calls.setdefault(name, []).append(feeds["input_ids"].shape)
            return bundle.runner(feeds)
        return run
    ways = {"one padded call": counted("one padded call"),
            "25% padding rule": by_length(counted("25% padding rule"), m.spec, max_rows=32),
            "measured costs": by_length(counted("measured costs"), m.spec, max_rows=32, cost=price)}
    for fn in ways.values():
        [fn(b) for b in batches]
    count = {name: (len(c), sum(r * s for r, s in c)) for name, c in calls.items()}
    times = {name: estimate(r) for name, r in interleave({n: (lambda fn=fn: [fn(b) for b in batches])
                                                          for n, fn in ways.items()},
                                                         rounds=7, block_s=1.0, min_runs=1, warmup=1).items()}
    items = 32 * len(batches)
    base = times["one padded call"].median
    print(f"\n{items} docstrings in {len(batches)} batches of 32, arrival order; {m.variant}")
    print(f"  {'':<20}{'items/s':>10}  {'interval':<18}{'vs one call':>12}{'calls':>8}{'tokens':>9}")
    for name, e in times.items():
        rate, slow, fast = e.rate(items)
        n, tokens = count[name]
        print(f"  {name:<20}{rate:>10,.1f}  [{slow:,.1f}-{fast:,.1f}]{'':<3}{base / e.median:>11.2f}x"
              f"{n:>8}{tokens:>9}")  # the calls of one pass over the workload (counted before the timing)
    ours, rule = times["measured costs"], times["25% padding rule"]
    verdict = ("met" if ours.median <= rule.median else "met (a tie inside the noise)" if not faster(rule, ours)
               else "NOT met")
    print(f"  goal: the measured cuts at least as fast as the 25% rule: {rule.median / ours.median:.2f}x of it, {verdict}")


if __name__ == "__main__":
    main()
