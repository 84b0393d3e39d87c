"""Reports: report.md (the choice and why first), report.json (everything, every sample) and the plots; the ratios."""
from __future__ import annotations

import json
from pathlib import Path

import msgspec

from .plots import latency, pareto, same_fidelity


def _fmt(x, spec="{:.3g}"):
    return "-" if x is None else spec.format(x)


class Ratios(msgspec.Struct, frozen=True):
    """One variant's throughput at the target batch size against eager and against the best fp32 variant; for a
    compressed variant, its throughput and artifact size against the same runtime without compression."""

    vs_eager: float | None = None
    vs_best_fp32: float | None = None
    vs_runtime: float | None = None
    size_vs_runtime: float | None = None


def ratios(result) -> dict[str, Ratios]:
    """``Ratios`` per variant name."""
    target = result.options.target
    variants = result.variants
    eager = next((r.throughput(target) for r in variants if r.name == "eager" and r.status in ("ok", "rejected")), None)
    best = max((r.throughput(target) for r in variants if r.ok and r.selectable and not r.compressed and r.throughput(target)),
               default=None)
    plain = {r.runtime: r for r in variants if r.name == r.runtime and r.status in ("ok", "rejected")}
    out = {}
    for r in variants:
        t, base = r.throughput(target), plain.get(r.runtime)
        against = r.compressed and base is not None and t and base.throughput(target)
        out[r.name] = Ratios(
            vs_eager=t / eager if t and eager else None, vs_best_fp32=t / best if t and best else None,
            vs_runtime=t / base.throughput(target) if against else None,
            size_vs_runtime=r.artifact_bytes / base.artifact_bytes if against and base.artifact_bytes and r.artifact_bytes
            else None)
    return out


def interval(stats) -> str:
    if stats is None:
        return "-"
    lo, hi = stats.throughput_interval
    return f"{lo:,.0f}-{hi:,.0f}"


def rows(result, target: int) -> list[dict]:
    """One flat row per variant, shared by the terminal table and report.md."""
    out = []
    ratio = ratios(result)
    chosen = result.chosen.name if result.chosen else None
    tied = set(result.decision.tied) if result.decision else set()
    for r in result.variants:
        s = r.profile.get(target)
        f = r.fidelity
        q = ratio[r.name]
        status = "reference" if r.ok and not r.selectable else r.status
        out.append({
            "variant": r.name + (" *" if r.name == chosen else " =" if r.name in tied else ""),
            "status": status,
            f"items/s @{target}": _fmt(s and s.throughput, "{:,.0f}"),
            "interval": interval(s),
            "rounds": _fmt(s and s.rounds, "{}"),
            f"p99 ms @{target}": _fmt(s and s.p99_ms, "{:.3g}"),
            "vs eager": _fmt(q.vs_eager, "{:.2f}x"),
            "vs best fp32": _fmt(q.vs_best_fp32, "{:.2f}x"),
            "vs its runtime": _fmt(q.vs_runtime, "{:.2f}x"),
            "cosine": _fmt(f and f.cosine, "{:.6f}"),
            "top-1": _fmt(f and f.top1, "{:.1%}"),
            "retrieval": _fmt(f and f.retrieval, "{:.3f}"),
            "raw input": _fmt(f and f.raw_cosine, "{:.6f}"),
            "accuracy": _fmt(f and f.accuracy, "{:.1%}"),
            "max abs err": _fmt(f and f.max_abs_error, "{:.2e}"),
            "size MB": _fmt(r.artifact_bytes and r.artifact_bytes / 2**20, "{:.2f}"),
            "cold start s": _fmt(r.cold_start_s, "{:.2f}"),
            "made from": f"{r.lineage.parent}" if r.lineage else "",
            "why": r.reason or "; ".join(x for x in (r.note, r.artifact and r.artifact.options.layout) if x),
        })
    return out


def _budget(result) -> str:
    signs = {"accuracy_drop": "<=", "cosine": ">=", "top1": ">=", "retrieval": ">="}
    return ", ".join(f"{k} {signs.get(k, '>=')} {v:g}" for k, v in result.budget.items())


def markdown(result) -> str:
    opts, m, d = result.options, result.machine, result.decision
    target = opts.target
    built = [r for r in result.variants if r.status in ("ok", "rejected")]
    cached = sum(1 for r in built if r.cached)
    skipped = [r for r in result.variants if r.status == "skipped"]
    lines = [f"# torchship optimize: {result.model}", "", f"**{result.message[0].upper() + result.message[1:]}.**", ""]
    if d is not None:
        lines += [d.why + ".", ""]
        if d.runner_up:
            lines += [f"Runner-up: {d.runner_up}, {d.runner_up_throughput:,.0f} items/s [{d.runner_up_interval[0]:,.0f}-"
                      f"{d.runner_up_interval[1]:,.0f}]; margin {d.margin:.2f}x{' round by round' if d.paired else ''}, "
                      + ("beyond the noise." if d.beyond_noise else "inside the noise: a tie."), ""]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines += [f"- **Note**: {n}." for n in result.notes]
    checked = next((r.fidelity.checked for r in result.variants if r.fidelity and r.fidelity.checked), ())
    raw = any(r.fidelity and r.fidelity.raw_floor is not None for r in result.variants)
    lines += [
        f"- Budget in force: {_budget(result)}. Verified on {result.verification} against eager fp32"
        + (f", and on inputs beyond them ({', '.join(checked)}), where a variant may be off by at most 3x its own error "
           "or 2%" if checked else "")
        + ("; and on raw input through the bundle's pipeline (below), against the original library's, where every item "
           "must keep its floor: 0.9999 for plain fp32, else the budget's cosine, or under a task-metric budget the "
           "cosine that 3x the variant's own error allows (`raw input`: the worst item's cosine)" if raw else "")
        + ".",
        "- Timing: interleaved rounds (every contender timed in turn, round after round, so a burst of load hits all "
        "alike); each figure is the median of every timed call, `[lo-hi]` a 90% confidence interval of that median over "
        "its rounds. A variant is faster than another only when the ratio of the two, round by round, has an interval above 1 "
        "(or, without shared rounds, when their intervals do not overlap); contenders inside the noise are timed for more "
        "rounds before a tie is called.",
    ]
    if result.noise is not None:
        lines.append(f"- {result.noise.describe(m['cores'])[0].upper() + result.noise.describe(m['cores'])[1:]}.")
    lines += [
        f"- Search: {len(result.variants)} variants planned, {len(built)} built ({cached} from the build cache), "
        f"{len(skipped)} skipped" + (f"; {result.wall_s:.0f} s" if result.wall_s else "") + ".",
        f"- Inputs and outputs: `{result.spec}`; batch sizes {list(opts.batch_sizes)}, the choice at {target}"
        + (f" with p99 under {opts.latency_slo_ms:g} ms" if opts.latency_slo_ms else "")
        + (", on the mix of lengths below" if result.mix else "") + ".",
        f"- Device {opts.device}; CPU {m['cpu']} ({m['cores']} cores, ISA: {', '.join(m['isa']) or 'none detected'}); "
        f"intra-op threads {m['threads']}; {versions}"
        + (f"; OpenVINO's CPU plugin runs natively: {', '.join(m['openvino_capabilities'])}" if m.get("openvino_capabilities") else "")
        + ".", "",
        f"## Variants at batch size {target}", "",
    ]
    table = rows(result, target)
    head = list(table[0]) if table else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row.values()) + " |" for row in table]
    lines += ["", "`*` the chosen variant, `=` tied with the fastest within the noise. `vs eager`: throughput relative to "
              "eager (eval + inference_mode); `vs best fp32`: to the fastest uncompressed variant; `vs its runtime`: a "
              "compressed variant relative to the same runtime without compression. `rounds`: how many rounds the figure "
              "comes from (variants far behind are dropped early).", ""]
    same = same_fidelity(result)
    lines += ["![latency and throughput per batch size](latency.png)", ""]
    if same is not None:
        lines += [f"Every timed variant has the same fidelity ({same:.6f}), so the second plot shows throughput alone.", ""]
    lines += ["![fidelity against throughput](pareto.png)", ""]
    lines += lengths(result)
    lines += bought(result)
    lines += text_pipeline(result)
    lines += ["## Per batch size", ""]
    for r in result.variants:
        cells = [f"{bs}: {v.throughput:,.0f}/s [{interval(v)}], p99 {v.p99_ms:.3g} ms" for bs, v in sorted(r.profile.items())]
        cells += [f"{bs}: {e}" for bs, e in sorted(r.profile_errors.items())]
        if cells:
            lines.append(f"- **{r.name}**: {'; '.join(cells)}")
    return "\n".join(lines) + "\n"


def lengths(result) -> list[str]:
    """Where the contenders were timed on a mix of lengths: the mix, and each size's throughput."""
    mix = result.mix
    if mix is None:
        return []
    target = result.options.target
    timed = [r for r in result.variants if r.by_length and r.status in ("ok", "rejected")]
    lines = ["## Timed at the lengths served", "",
             f"Every contender was timed on a mix of `{mix.dim}`: {mix.describe()}. A timed call is one batch of {target} "
             "at each size; its time is their weighed sum, so the items/s above are on that mix, and the choice is made "
             "on it. Each size alone, items/s at batch size " + f"{target} (median of its calls):", ""]
    lines += ["| variant | " + " | ".join(f"{mix.dim}={s}" for s in mix.sizes) + " |", "|" + "---|" * (len(mix.sizes) + 1)]
    for r in timed:
        lines.append(f"| {r.name} | " + " | ".join(_fmt(r.by_length.get(s) and r.by_length[s].throughput, "{:,.0f}")
                                                  for s in mix.sizes) + " |")
    return lines + [""]


def text_pipeline(result) -> list[str]:
    """The bundle's processing (text or images in, labels out) and its end-to-end check, where it has some."""
    p = result.processing
    if p is None:
        return []
    lines = ["## Raw input and answers", ""]
    if p.text is not None:
        t = p.text
        lines.append(f"The bundle takes text (input `{t.input}`, one string an item) through its own `{t.tokenizer}` "
                     f"(Hugging Face tokenizers), {'truncated' if t.truncate else 'refused'} past {t.max_length} tokens "
                     f"and padded to the longest of each batch; the answer is `{t.output or 'every output'}`.")
    if p.image is not None:
        i = p.image
        steps = [f"resize to {i.size[0]}x{i.size[1]}" if i.size else f"shorter side to {i.shortest_edge}" if i.shortest_edge
                 else "", f"center crop {i.crop[0]}x{i.crop[1]}" if i.crop else "", f"rescale x{i.rescale:.6g}" if i.rescale
                 else "", "normalize" if i.mean else ""]
        lines.append(f"The bundle takes images (input `{i.input}`, one encoded file an item: JPEG, PNG, WebP...): "
                     f"decoded with Pillow, turned upright by EXIF, RGB, then {', '.join(x for x in steps if x)}.")
    if p.labels is not None:
        lines.append(f"Answers carry `label` and `score` (softmax of `{p.labels.output}`) over {len(p.labels.names)} "
                     "classes; `top_k` on request.")
    c = p.check
    if c is not None:
        same = (("the same tokens" if c.kind == "text" else f"pixel values within {c.max_input_error:.2g}")
                if c.inputs_equal else "OTHER MODEL INPUTS")
        lines += ["", f"Checked end to end against {c.reference} on {c.items} items in one batch ({', '.join(c.cases)}): "
                      f"{same} on every item, cosine at least {c.min_cosine:.7f} "
                      f"({f'floor {c.floor}' if c.floor else 'no floor: a task-metric budget, its own error unknown'}), "
                      f"largest difference {c.max_abs_error:.2g}"
                      + ("" if c.source_min_cosine is None else f"; the source model in eager fp32 through the same "
                         f"pipeline at least {c.source_min_cosine:.7f}")
                      + ("" if c.labels_equal is None else
                                                   ", the same best label" if c.labels_equal else ", OTHER LABELS")
                      + (": passed." if c.passed else ": FAILED.")]
    return lines + [""]


def bought(result) -> list[str]:
    """One line per compressed variant: its speed, size and fidelity against the same runtime uncompressed."""
    plain = {r.runtime: r for r in result.variants if r.name == r.runtime}
    ratio = ratios(result)
    lines = []
    for r in result.variants:
        base, q = plain.get(r.runtime), ratio[r.name]
        if q.vs_runtime is None or base is None:
            continue
        f, fb = r.fidelity, base.fidelity
        quality = (f"accuracy {f.accuracy:.1%} (fp32 {f.reference_accuracy:.1%})" if f and f.accuracy is not None
                   else f"cosine {f.cosine:.4f} (plain {fb.cosine if fb else float('nan'):.4f})" if f else "")
        size = f", {q.size_vs_runtime:.2f}x the size" if q.size_vs_runtime else ""
        how = f"; trained {r.training.epochs} epochs in {r.training.seconds:.0f} s" if r.training else ""
        lines.append(f"- **{r.name}** ({r.status}): {q.vs_runtime:.2f}x the throughput of {base.name}{size}; "
                     f"{quality}{how}")
    return ["## What each transform bought", "", *lines, ""] if lines else []


def write_report(result, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    (directory / "report.md").write_text(markdown(result))
    latency(result, directory / "latency.png")
    pareto(result, result.options.target, directory / "pareto.png")
