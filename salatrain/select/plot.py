"""scores.png: per-layer metric drops and scores, kept layers marked (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_scores(path: Path, plan: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = plan["layers"]
    idx = [row["index"] for row in layers]
    kept = [row["kept"] for row in layers]
    stepwise = plan["method"] == "stepwise"
    # stepwise leaves forced layers unmeasured (None): drawn as 0
    every = any if stepwise else all
    has_metrics = every(row.get("retrieval") is not None for row in layers)
    has_scores = every(row.get("score") is not None for row in layers)
    rows = 1 + has_metrics
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.28 * len(idx) + 2), 2.8 * rows), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    colors = ["tab:red" if k else "tab:gray" for k in kept]
    ax = axes[0]
    heights = [(row["score"] or 0.0) if has_scores else float(row["kept"]) for row in layers]
    ax.bar(idx, heights, color=colors)
    for i, row in zip(idx, layers):
        if row["kept"]:
            ax.annotate("*" if row.get("forced") is None else "F", (i, heights[i]), ha="center", va="bottom")
    ax.set_ylabel(("gain in R when kept" if stepwise else "score") if has_scores else "kept")
    kept_idx = [i for i, k in zip(idx, kept) if k]
    ax.set_title(f"{plan['method']}: {len(kept_idx)} of {len(idx)} layers stay sparse attention {kept_idx}"
                 "\n(red = kept: * by score, F forced by keep_first/keep_last/include)", fontsize=9)
    if has_scores and plan["method"] == "halo" and any(h >= 50 for h in heights):
        ax.axhline(50, color="black", lw=0.6, ls=":")
        ax.annotate("clip at 50", (idx[0] - 0.5, 50), fontsize=7, va="bottom")
    if has_metrics:
        ax = axes[1]
        width = 0.4
        kind = "gain" if stepwise else "drop"
        ax.bar([i - width / 2 for i in idx], [row[f"retrieval_{kind}"] or 0.0 for row in layers], width,
               label=f"retrieval {kind}")
        ax.bar([i + width / 2 for i in idx], [row[f"commonsense_{kind}"] or 0.0 for row in layers], width,
               label=f"commonsense {kind}")
        ax.set_ylabel("gain when its attention is restored\n(at the step chosen, else the last)" if stepwise else
                      "drop when linearised\n(best layer − this layer)", fontsize=8)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("layer")
    axes[-1].set_xticks(idx)
    axes[-1].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
