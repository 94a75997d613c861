"""Rendering of the ground-truth benchmark: a Markdown table, raw JSON, and the recall plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402

VARIANT_LABELS = {"batchtopk": "standard (BatchTopK)", "dsf": "DSF", "dfc": "DFC"}


def render_toy_benchmark(out: Path, settings, rows: list[dict], table: list[dict]) -> list[Path]:
    """Write ``results.json``, ``table.md`` and ``recall.png`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    results.write_text(json.dumps({"settings": dataclasses.asdict(settings), "runs": rows, "table": table}, indent=2))
    markdown = out / "table.md"
    markdown.write_text(_markdown_table(settings, table))
    plot = out / "recall.png"
    _plot(table, plot)
    return [results, markdown, plot]


def _markdown_table(settings, table: list[dict]) -> str:
    lines = [
        "# Ground-truth benchmark: exclusive-concept recovery",
        "",
        f"{len(settings.seeds)} seeds per cell; k={settings.k}; DFC exclusive fraction "
        f"{settings.exclusive_fraction} per model; {settings.steps} steps × {settings.batch_size} pairs. "
        "Recall: exclusive concepts recovered (decoder cosine ≥ 0.9) by a feature classified exclusive "
        "to the right model. FP shared / unmatched: features classified exclusive that match a shared "
        f"concept / no concept. *Checked*: after the exclusivity check (ratio < {settings.exclusivity_cut}).",
        "",
        "| variant | D | excl. recall | FP shared | FP unmatched | recall (checked) | FP shared (checked) "
        "| FP unmatched (checked) | FVE A | FVE B | dead % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {VARIANT_LABELS.get(r['architecture'], r['architecture'])} | {r['dict_size']} "
            f"| {r['exclusive_recall']:.2f} ± {r['exclusive_recall_se']:.2f} | {r['fp_shared']:.1f} "
            f"| {r['fp_unmatched']:.1f} | {r['checked_exclusive_recall']:.2f} ± {r['checked_exclusive_recall_se']:.2f} "
            f"| {r['checked_fp_shared']:.1f} | {r['checked_fp_unmatched']:.1f} | {r['fve_a']:.3f} "
            f"| {r['fve_b']:.3f} | {100 * r['dead_fraction']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(table: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for architecture in sorted({r["architecture"] for r in table}):
        rows = sorted((r for r in table if r["architecture"] == architecture), key=lambda r: r["dict_size"])
        sizes = [r["dict_size"] for r in rows]
        label = VARIANT_LABELS.get(architecture, architecture)
        for axis, key in ((axes[0], "exclusive_recall"), (axes[1], "fp_total")):
            if key == "fp_total":
                mean = [r["fp_shared"] + r["fp_unmatched"] for r in rows]
                se = [r["fp_shared_se"] + r["fp_unmatched_se"] for r in rows]
            else:
                mean = [r[key] for r in rows]
                se = [r[f"{key}_se"] for r in rows]
            line = axis.plot(sizes, mean, marker="o", label=label)[0]
            axis.fill_between(sizes, [m - s for m, s in zip(mean, se, strict=True)],
                              [m + s for m, s in zip(mean, se, strict=True)], color=line.get_color(), alpha=0.2)
        checked = [r["checked_exclusive_recall"] for r in rows]
        if architecture == "dfc":
            axes[0].plot(sizes, checked, linestyle="--", marker="x", color="black", label="DFC + exclusivity check")
            axes[1].plot(sizes, [r["checked_fp_shared"] + r["checked_fp_unmatched"] for r in rows],
                         linestyle="--", marker="x", color="black", label="DFC + exclusivity check")
    axes[0].set(title="Exclusive-concept recall", xlabel="dictionary size", ylabel="recall", ylim=(0, 1.05), xscale="log")
    axes[1].set(title="False positives (features)", xlabel="dictionary size", ylabel="count", xscale="log")
    sizes = sorted({r["dict_size"] for r in table})
    for axis in axes:
        axis.set_xticks(sizes, [str(size) for size in sizes])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
