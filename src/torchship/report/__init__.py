"""Reports: report.json, report.md and PNG plots (latency and throughput against batch size)."""
from __future__ import annotations

import json
from pathlib import Path

from ..spec import IOSpec


def _fmt(x, spec="{:.3g}"):
    return "-" if x is None else spec.format(x)


def rows(result, target: int) -> list[dict]:
    """One flat row per variant, shared by the terminal table and report.md."""
    out = []
    for r in result.variants:
        s = (r.get("profile") or {}).get(str(target)) or {}
        f = r.get("fidelity") or {}
        out.append({
            "variant": r["name"] + (" *" if r.get("selected") else ""),
            "status": "reference" if r["status"] == "ok" and not r["selectable"] else r["status"],
            f"items/s @{target}": _fmt(s.get("throughput"), "{:,.0f}"),
            f"p50 ms @{target}": _fmt(s.get("p50_ms"), "{:.2f}"),
            f"p99 ms @{target}": _fmt(s.get("p99_ms"), "{:.2f}"),
            "vs eager": _fmt(r.get("vs_eager"), "{:.2f}x"),
            "vs its runtime": _fmt(r.get("vs_runtime"), "{:.2f}x"),
            "cosine": _fmt(f.get("cosine"), "{:.6f}"),
            "top-1": _fmt(f.get("top1"), "{:.1%}"),
            "max abs err": _fmt(f.get("max_abs_error"), "{:.2e}"),
            "size MB": _fmt(r.get("artifact_bytes") and r["artifact_bytes"] / 2**20, "{:.2f}"),
            "sparsity": _fmt(r.get("sparsity"), "{:.0%}"),
            "cold start s": _fmt(r.get("cold_start_s"), "{:.2f}"),
            "why": r.get("reason") or r.get("note") or "",
        })
    return out


def plot(result, path_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in result.variants:
        prof = {int(k): v for k, v in (r.get("profile") or {}).items() if "p50_ms" in v}
        if not prof:
            continue
        bs = sorted(prof)
        style = "-" if r["status"] == "ok" else ":"
        label = r["name"] + ("" if r["status"] == "ok" else f" ({r['status']})")
        ax1.plot(bs, [prof[b]["p50_ms"] for b in bs], style, marker="o", label=label)
        ax2.plot(bs, [prof[b]["throughput"] for b in bs], style, marker="o", label=label)
    sizes = sorted({int(k) for r in result.variants for k in (r.get("profile") or {})})
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
        s = ((r.get("profile") or {}).get(str(target)) or {}).get("throughput")
        f = r.get("fidelity") or {}
        y = f.get("accuracy") if f.get("accuracy") is not None else f.get("cosine")
        if s and y is not None:
            points.append((s, y, r["name"], r["status"] if r["selectable"] else "reference"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, y, name, status in points:
        color = {"ok": "tab:green", "reference": "tab:gray"}.get(status, "tab:red")
        ax.scatter(s, y, c=color, marker="x" if status == "rejected" else "o")
        ax.annotate(name, (s, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    labelled = any((r.get("fidelity") or {}).get("accuracy") is not None for r in result.variants)
    ax.set_xscale("log")
    ax.set_xlabel(f"items / s at batch size {target}")
    ax.set_ylabel("test accuracy" if labelled else "cosine similarity to fp32 eager")
    ax.set_title(f"{result.model}: fidelity against throughput (green: within budget, red x: rejected, grey: reference)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def markdown(result, meta: dict) -> str:
    target = meta["target_batch_size"]
    m = result.machine
    lines = [f"# torchship optimize: {result.model}", "",
             f"**{result.message}.**", "",
             f"- Inputs and outputs: `{IOSpec.from_dict(meta['spec'])}`",
             f"- Verified on {meta['verification']} against eager fp32; budget {meta['budget']}",
             f"- Device {meta['device']}; CPU {m['cpu']} ({m['cores']} cores, ISA: {', '.join(m['isa']) or 'none detected'}); "
             f"intra-op threads {m['threads']}; torch {m['torch']}, onnxruntime {m['onnxruntime']}",
             f"- Timed per batch size {meta['batch_sizes']} after warm-up (p50 of repeated runs); table at batch size {target}",
             "", "![latency and throughput](latency.png)", "", "![fidelity against throughput](pareto.png)", ""]
    table = rows(result, target)
    head = list(table[0]) if table else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row.values()) + " |" for row in table]
    lines += ["", "`*` marks the chosen variant. `vs eager` is throughput relative to eager (eval + inference_mode); "
              "`vs its runtime` that of a compressed variant relative to the same runtime without compression.", ""]
    lines += bought(result.variants)
    lines += ["## Per batch size", ""]
    for r in result.variants:
        prof = r.get("profile") or {}
        if prof:
            cells = ", ".join(f"{bs}: {v['throughput']:,.0f}/s p99 {v['p99_ms']:.2f} ms" if "p50_ms" in v else f"{bs}: {v.get('error')}"
                              for bs, v in prof.items())
            lines.append(f"- **{r['name']}**: {cells}")
    return "\n".join(lines) + "\n"


def bought(variants: list[dict]) -> list[str]:
    """One line per compressed variant: its speed, size and fidelity against the same runtime uncompressed."""
    plain = {r["runtime"]: r for r in variants if r["name"] == r["runtime"]}
    lines = []
    for r in variants:
        base = plain.get(r["runtime"])
        if r.get("vs_runtime") is None or base is None:
            continue
        f, fb = r.get("fidelity") or {}, base.get("fidelity") or {}
        quality = (f"accuracy {f['accuracy']:.1%} (fp32 {f['reference_accuracy']:.1%})" if f.get("accuracy") is not None
                   else f"cosine {f.get('cosine', float('nan')):.4f} (plain {fb.get('cosine', float('nan')):.4f})")
        size = f", {r['size_vs_runtime']:.2f}x the size" if r.get("size_vs_runtime") else ""
        trained = r.get("training")
        how = f"; trained {trained['epochs']} epochs in {trained['seconds']:.0f} s" if trained else ""
        lines.append(f"- **{r['name']}** ({r['status']}): {r['vs_runtime']:.2f}x the throughput of {base['name']}{size}; "
                     f"{quality}{how}")
    return ["## What each transform bought", "", *lines, ""] if lines else []


def write_report(result, meta: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps({**result.to_dict(), "meta": meta}, indent=2, default=str))
    (directory / "report.md").write_text(markdown(result, meta))
    plot(result, directory / "latency.png")
    pareto(result, meta["target_batch_size"], directory / "pareto.png")
