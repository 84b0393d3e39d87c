"""The report's plots: latency and throughput per batch size, and fidelity against throughput.

Every variant gets its own colour and marker (no pair repeats), the chosen one is drawn bold with a star, the legend
sits outside the data, and throughputs that span decades are on a log axis.
"""
from __future__ import annotations

from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def styles(names: list[str]) -> dict[str, tuple]:
    """(colour, marker) per name, every pair distinct: 10 colours x 10 markers."""
    plt = _pyplot()
    colours = plt.get_cmap("tab10").colors
    return {n: (colours[i % 10], MARKERS[(i // 10 + i) % len(MARKERS)]) for i, n in enumerate(names)}


def latency(result, path: Path) -> None:
    plt = _pyplot()
    timed = [r for r in result.variants if r.profile]
    style = styles([r.name for r in timed])
    chosen = result.chosen.name if result.chosen else None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.6))
    for r in timed:
        bs = sorted(r.profile)
        colour, marker = style[r.name]
        bold = r.name == chosen
        label = r.name + (" (chosen)" if bold else "" if r.ok else f" ({r.status})")
        kw = dict(color=colour, marker="*" if bold else marker, markersize=11 if bold else 5, linewidth=2.6 if bold else 1.1,
                  linestyle="-" if r.ok else ":", label=label, zorder=3 if bold else 2)
        p50 = [r.profile[b].p50_ms for b in bs]
        lo = [r.profile[b].p50_ms - (r.profile[b].lo_ms or r.profile[b].p50_ms) for b in bs]
        hi = [(r.profile[b].hi_ms or r.profile[b].p50_ms) - r.profile[b].p50_ms for b in bs]
        ax1.errorbar(bs, p50, yerr=[lo, hi], capsize=2, **kw)
        tput = [r.profile[b].throughput for b in bs]
        t_lo = [r.profile[b].throughput - r.profile[b].throughput_interval[0] for b in bs]
        t_hi = [r.profile[b].throughput_interval[1] - r.profile[b].throughput for b in bs]
        ax2.errorbar(bs, tput, yerr=[t_lo, t_hi], capsize=2, **kw)
    sizes = sorted({k for r in timed for k in r.profile})
    for ax, title, ylabel in ((ax1, "median latency per batch", "ms per batch"), (ax2, "throughput", "items / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=7.5, frameon=False)
    fig.suptitle(f"{result.model}: bars are the interval of each median", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.80, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _x_scale(ax, values) -> None:
    """Log where the values span more than a decade, linear (bars that start at zero) otherwise."""
    values = [v for v in values if v]
    if values and max(values) > 10 * min(values):
        ax.set_xscale("log")


def _fidelity(r, labelled: bool):
    f = r.fidelity
    if f is None:
        return None
    return f.accuracy if labelled and f.accuracy is not None else f.cosine


def same_fidelity(result) -> float | None:
    """The one fidelity every timed variant has (to 6 digits), or None when they differ."""
    labelled = any(r.fidelity and r.fidelity.accuracy is not None for r in result.variants)
    values = {round(v, 6) for r in result.variants if r.profile and (v := _fidelity(r, labelled)) is not None}
    return values.pop() if len(values) == 1 else None


def pareto(result, target: int, path: Path) -> None:
    """Fidelity (accuracy with labels, else cosine to fp32) against throughput at the target batch size; when every
    variant has the same fidelity, throughput alone as bars, and the title says so."""
    plt = _pyplot()
    labelled = any(r.fidelity and r.fidelity.accuracy is not None for r in result.variants)
    points = [r for r in result.variants if r.throughput(target) and _fidelity(r, labelled) is not None]
    style = styles([r.name for r in points])
    chosen = result.chosen.name if result.chosen else None
    colour_of = {"ok": "tab:green", "rejected": "tab:red"}
    same = same_fidelity(result)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    if same is not None:
        order = sorted(points, key=lambda r: r.throughput(target))
        ax.barh([r.name for r in order], [r.throughput(target) for r in order],
                color=["tab:orange" if r.name == chosen else colour_of.get(r.status if r.selectable else "", "tab:gray")
                       for r in order])
        _x_scale(ax, [r.throughput(target) for r in order])
        ax.set_xlabel(f"items / s at batch size {target}")
        metric = "accuracy" if labelled else "cosine to fp32 eager"
        ax.set_title(f"{result.model}: every variant has the same fidelity ({metric} {same:.6f}); throughput alone "
                     "decides (orange: chosen)", fontsize=9)
    else:
        for r in points:
            colour, marker = style[r.name]
            bold = r.name == chosen
            edge = "black" if bold else colour_of.get(r.status if r.selectable else "", "tab:gray")
            ax.scatter(r.throughput(target), _fidelity(r, labelled), color=colour, marker="*" if bold else marker,
                       s=220 if bold else 45, edgecolors=edge, linewidths=1.2,
                       label=r.name + (" (chosen)" if bold else "" if r.ok else f" ({r.status if r.selectable else 'reference'})"))
        _x_scale(ax, [r.throughput(target) for r in points])
        ax.set_xlabel(f"items / s at batch size {target}")
        ax.set_ylabel("test accuracy" if labelled else "cosine similarity to fp32 eager")
        ax.set_title(f"{result.model}: fidelity against throughput (batch size {target})", fontsize=10)
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7.5, frameon=False)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
