"""Reports: report.json, report.md and PNG plots (latency and throughput against batch size); the ratios."""
from __future__ import annotations

import json
from pathlib import Path



def _fmt(x, spec="{:.3g}"):
    return "-" if x is None else spec.format(x)


def ratios(result) -> dict[str, dict[str, float | None]]:
    """Per variant: throughput at the target batch size against eager and against the best fp32 variant; for a
    compressed variant, throughput and artifact size against the same runtime without compression."""
    target = result.options.target
    variants = result.variants
    eager = next((r.throughput(target) for r in variants if r.name == "eager" and r.status in ("ok", "rejected")), None)
    best = max((r.throughput(target) for r in variants if r.ok and r.selectable and not r.compressed and r.throughput(target)),
               default=None)
    plain = {r.runtime: r for r in variants if r.name == r.runtime and r.status in ("ok", "rejected")}
    out = {}
    for r in variants:
        t, base = r.throughput(target), plain.get(r.runtime)
        row = {"vs_eager": t / eager if t and eager else None, "vs_best_fp32": t / best if t and best else None,
               "vs_runtime": None, "size_vs_runtime": None}
        if r.compressed and base is not None and t and base.throughput(target):
            row["vs_runtime"] = t / base.throughput(target)
            row["size_vs_runtime"] = r.artifact_bytes / base.artifact_bytes if base.artifact_bytes and r.artifact_bytes else None
        out[r.name] = row
    return out


def rows(result, target: int) -> list[dict]:
    """One flat row per variant, shared by the terminal table and report.md."""
    out = []
    ratio = ratios(result)
    chosen = result.chosen.name if result.chosen else None
    for r in result.variants:
        s = r.profile.get(target)
        f = r.fidelity
        q = ratio[r.name]
        out.append({
            "variant": r.name + (" *" if r.name == chosen else ""),
            "status": "reference" if r.ok and not r.selectable else r.status,
            f"items/s @{target}": _fmt(s and s.throughput, "{:,.0f}"),
            f"p50 ms @{target}": _fmt(s and s.p50_ms, "{:.2f}"),
            f"p99 ms @{target}": _fmt(s and s.p99_ms, "{:.2f}"),
            "vs eager": _fmt(q["vs_eager"], "{:.2f}x"),
            "vs its runtime": _fmt(q["vs_runtime"], "{:.2f}x"),
            "cosine": _fmt(f and f.cosine, "{:.6f}"),
            "top-1": _fmt(f and f.top1, "{:.1%}"),
            "max abs err": _fmt(f and f.max_abs_error, "{:.2e}"),
            "size MB": _fmt(r.artifact_bytes and r.artifact_bytes / 2**20, "{:.2f}"),
            "sparsity": _fmt(r.sparsity, "{:.0%}"),
            "cold start s": _fmt(r.cold_start_s, "{:.2f}"),
            "why": r.reason or r.note or "",
        })
    return out


def plot(result, path_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in result.variants:
        prof = r.profile
        if not prof:
            continue
        bs = sorted(prof)
        style = "-" if r.ok else ":"
        label = r.name + ("" if r.ok else f" ({r.status})")
        ax1.plot(bs, [prof[b].p50_ms for b in bs], style, marker="o", label=label)
        ax2.plot(bs, [prof[b].throughput for b in bs], style, marker="o", label=label)
    sizes = sorted({k for r in result.variants for k in r.profile})
    for ax, title, ylabel in ((ax1, "p50 latency", "ms per batch"), (ax2, "throughput", "items / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{result.model}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def pareto(result, target: int, path_png: Path) -> None:
    """Fidelity (accuracy with labels, else cosine to fp32) against throughput at the target batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = []
    for r in result.variants:
        s, f = r.throughput(target), r.fidelity
        y = None if f is None else f.accuracy if f.accuracy is not None else f.cosine
        if s and y is not None:
            points.append((s, y, r.name, r.status if r.selectable else "reference"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, y, name, status in points:
        color = {"ok": "tab:green", "reference": "tab:gray"}.get(status, "tab:red")
        ax.scatter(s, y, c=color, marker="x" if status == "rejected" else "o")
        ax.annotate(name, (s, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    labelled = any(r.fidelity and r.fidelity.accuracy is not None for r in result.variants)
    ax.set_xscale("log")
    ax.set_xlabel(f"items / s at batch size {target}")
    ax.set_ylabel("test accuracy" if labelled else "cosine similarity to fp32 eager")
    ax.set_title(f"{result.model}: fidelity against throughput (green: within budget, red x: rejected, grey: reference)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def markdown(result) -> str:
    target = result.options.target
    m = result.machine
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [f"# torchship optimize: {result.model}", "",
             f"**{result.message}.**", "",
             f"- Inputs and outputs: `{result.spec}`",
             f"- Verified on {result.verification} against eager fp32; budget "
             + ", ".join(f"{k} {'<=' if k == 'accuracy_drop' else '>='} {v}" for k, v in result.budget.items()),
             f"- Device {result.options.device}; CPU {m['cpu']} ({m['cores']} cores, ISA: {', '.join(m['isa']) or 'none detected'}); "
             f"intra-op threads {m['threads']}; {versions}",
             f"- Timed per batch size {list(result.options.batch_sizes)} after warm-up (p50 of repeated runs); table at batch size {target}",
             "", "![latency and throughput](latency.png)", "", "![fidelity against throughput](pareto.png)", ""]
    table = rows(result, target)
    head = list(table[0]) if table else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row.values()) + " |" for row in table]
    lines += ["", "`*` marks the chosen variant. `vs eager` is throughput relative to eager (eval + inference_mode); "
              "`vs its runtime` that of a compressed variant relative to the same runtime without compression.", ""]
    lines += bought(result)
    lines += ["## Per batch size", ""]
    for r in result.variants:
        cells = [f"{bs}: {v.throughput:,.0f}/s p99 {v.p99_ms:.2f} ms" for bs, v in sorted(r.profile.items())]
        cells += [f"{bs}: {e}" for bs, e in sorted(r.profile_errors.items())]
        if cells:
            lines.append(f"- **{r.name}**: {', '.join(cells)}")
    return "\n".join(lines) + "\n"


def bought(result) -> list[str]:
    """One line per compressed variant: its speed, size and fidelity against the same runtime uncompressed."""
    plain = {r.runtime: r for r in result.variants if r.name == r.runtime}
    ratio = ratios(result)
    lines = []
    for r in result.variants:
        base, q = plain.get(r.runtime), ratio[r.name]
        if q["vs_runtime"] is None or base is None:
            continue
        f, fb = r.fidelity, base.fidelity
        quality = (f"accuracy {f.accuracy:.1%} (fp32 {f.reference_accuracy:.1%})" if f and f.accuracy is not None
                   else f"cosine {f.cosine:.4f} (plain {fb.cosine if fb else float('nan'):.4f})" if f else "")
        size = f", {q['size_vs_runtime']:.2f}x the size" if q["size_vs_runtime"] else ""
        how = f"; trained {r.training['epochs']} epochs in {r.training['seconds']:.0f} s" if r.training else ""
        lines.append(f"- **{r.name}** ({r.status}): {q['vs_runtime']:.2f}x the throughput of {base.name}{size}; "
                     f"{quality}{how}")
    return ["## What each transform bought", "", *lines, ""] if lines else []


def write_report(result, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    (directory / "report.md").write_text(markdown(result))
    plot(result, directory / "latency.png")
    pareto(result, result.options.target, directory / "pareto.png")
