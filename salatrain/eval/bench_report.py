"""`salatrain bench` output: speed-ups against the baseline, the table, bench.png (log-log) and the W&B table."""

from __future__ import annotations

from pathlib import Path

from .bench_memory import GIB
from .report import format_table


def format_length(n: int) -> str:
    """8192 → "8K", 1048576 → "1M", 1000 → "1000"."""
    for suffix, unit in (("M", 1024**2), ("K", 1024)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def speedups(report: dict) -> None:
    """Adds ``prefill_speedup`` (baseline prefill time / this one) and ``decode_speedup`` (this decode rate /
    the baseline's) to every row of a model other than the baseline where both runs completed."""
    base = report.get("baseline")
    rows = report["results"]
    ref = {r["length"]: r for r in rows if r["model"] == base and r["status"] == "ok"}
    for r in rows:
        b = ref.get(r["length"])
        ok = r["model"] != base and b is not None and r["status"] == "ok"
        r["prefill_speedup"] = b["prefill_s"] / r["prefill_s"] if ok else None
        r["decode_speedup"] = r["decode_tokens_per_s"] / b["decode_tokens_per_s"] if ok else None


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(report: dict) -> str:
    """One row per length and model; OOM rows say so."""
    dev = report["device"]
    base = report.get("baseline")
    header = ["length", "model", "prefill s", "prefill tok/s", "decode tok/s", "peak GiB", "cache MiB"]
    if base is not None:
        header += [f"prefill x vs {base}", f"decode x vs {base}"]
    header.append("note")
    rows = []
    for r in sorted(report["results"], key=lambda r: r["length"]):
        oom = r["status"] == "oom"
        row = [format_length(r["length"]), r["model"], "OOM" if oom else _num(r["prefill_s"], ".3f"),
               _num(r["prefill_tokens_per_s"], ".0f"), _num(r["decode_tokens_per_s"], ".1f"),
               _num(None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / GIB, ".2f"),
               _num(None if r["cache_bytes"] is None else r["cache_bytes"] / 2**20, ".1f")]
        if base is not None:
            row += [_num(r.get("prefill_speedup"), ".2f"), _num(r.get("decode_speedup"), ".2f")]
        row.append(r["note"] if oom else (r.get("decode_note") or ("decode: CUDA graphs" if r.get("decode_graphs")
                                                                     else "")))
        rows.append(row)
    rows = _right_aligned(header, rows, skip={1, len(header) - 1})
    title = (f"{dev['name']} ({dev['type']}), {dev['dtype']}, batch {dev['batch_size']}, "
             f"decode {report['settings']['decode_tokens']} tokens; peak = {dev['memory_measure']}")
    return title + "\n" + format_table(header, rows)


def _right_aligned(header: list[str], rows: list[list[str]], skip: set[int]) -> list[list[str]]:
    """Pad the cells of every column but ``skip`` to the column's width, so "1K", "OOM" and "-" line up with the
    numbers (format_table right-aligns only cells that parse as numbers)."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    return [[c if i in skip else c.rjust(widths[i]) for i, c in enumerate(r)] for r in rows]


def plot(path: Path, report: dict) -> Path:
    """Prefill seconds and decode milliseconds per token against prompt length, log-log, one line per model; a
    model's OOM lengths are crosses along the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "prefill (time to first token), s", lambda r: r["prefill_s"]),
              (axes[1], "decode, ms per token", lambda r: 1000.0 * (r["batch"] / r["decode_tokens_per_s"])))
    batch = report["device"]["batch_size"]
    for i, m in enumerate(report["models"]):
        rows = sorted((r for r in report["results"] if r["model"] == m["name"]), key=lambda r: r["length"])
        ok = [dict(r, batch=batch) for r in rows if r["status"] == "ok"]
        oom = [r["length"] for r in rows if r["status"] == "oom"]
        color = f"C{i}"
        for ax, _, value in panels:
            if ok:
                ax.plot([r["length"] for r in ok], [value(r) for r in ok], "o-", color=color, label=m["name"])
            if oom:
                ax.plot(oom, [0.97] * len(oom), "x", color=color, ms=9, mew=2, transform=ax.get_xaxis_transform(),
                        label=f"{m['name']}: OOM")
    lengths = sorted({r["length"] for r in report["results"]})
    for ax, ylabel, _ in panels:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.set_xlabel("prompt length, tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=8)
    dev = report["device"]
    fig.suptitle(f"salatrain bench: {dev['name']}, {dev['dtype']}, batch {batch}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_wandb(run, report: dict, png: Path) -> None:
    from ..tracking import log_wandb_table

    cols = ["model", "length", "status", "prefill_s", "prefill_tokens_per_s", "decode_tokens_per_s",
            "peak_memory_bytes", "cache_bytes", "prefill_speedup", "decode_speedup"]
    rows = [[r.get(c) for c in cols] for r in report["results"]]
    summary = {}
    for r in report["results"]:
        at = f"{r['model']}/{{}}@{r['length']}"
        if r["status"] == "ok":
            summary[at.format("prefill_s")] = r["prefill_s"]
            summary[at.format("decode_tokens_per_s")] = r["decode_tokens_per_s"]
            summary[at.format("peak_memory_gib")] = r["peak_memory_bytes"] / GIB
        else:
            summary[at.format("status")] = "oom"
    summary["device"] = report["device"]["name"]
    log_wandb_table(run, "bench", cols, rows, images={"bench": png}, summary=summary)
