"""The pipeline's results as a picture and as Markdown."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class StageFigures:
    """One row of the results table."""

    stage: str  # "Original", "Pruned", "Quantized", "CoreML"
    artifact: str
    engine: str
    size_bytes: int
    zipped_bytes: int
    target_psnr_db: float | None
    fidelity_psnr_db: float | None
    latency_ms: float | None
    latency_p90_ms: float | None = None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["size_kb"] = round(self.size_bytes / 1000, 2)
        d["zipped_kb"] = round(self.zipped_bytes / 1000, 2)
        for k in ("target_psnr_db", "fidelity_psnr_db", "latency_ms", "latency_p90_ms"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 3)
        return d


def results_markdown(stages: Sequence[StageFigures], caption: str) -> str:
    lines = ["| Stage | Artifact | Size (KB) | Zipped (KB) | PSNR (dB) | Fidelity (dB) | Inference time (ms) | Engine |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for s in stages:
        lines.append(
            f"| {s.stage} | `{s.artifact}` | {s.size_bytes / 1000:.1f} | {s.zipped_bytes / 1000:.1f} | "
            f"{format_figure(s.target_psnr_db)} | {format_figure(s.fidelity_psnr_db)} | {format_figure(s.latency_ms)} | {s.engine} |")
    return "\n".join(lines) + "\n\n" + caption.strip() + "\n"


def format_figure(v: float | None) -> str:
    """A dB or ms figure for a table: two decimals, '-' when absent, 'ref' for the reference's inf."""
    if v is None:
        return "-"
    return "ref" if v == float("inf") else f"{v:.2f}"


def results_figure(stages: Sequence[StageFigures], examples: Sequence[tuple[str, Sequence[np.ndarray]]],
                   columns: Sequence[str], path: Path, title: str) -> None:
    """Bar charts of size, PSNR and latency per stage, and a strip of example faces.

    ``examples``: (name, images) per example row, images uint8 (H, W, 3) in ``columns`` order
    (e.g. input, each stage's output, target).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.stage for s in stages]
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"][: len(stages)]
    n_ex = len(examples)
    n_cols = max(len(columns), 3)
    fig = plt.figure(figsize=(2.3 * n_cols, 4.2 + 2.4 * n_ex), constrained_layout=True)
    gs = fig.add_gridspec(1 + n_ex, n_cols, height_ratios=[1.75] + [1.0] * n_ex)
    charts = gs[0, :].subgridspec(1, 3)

    ax = fig.add_subplot(charts[0])
    x = np.arange(len(stages))
    ax.bar(x - 0.2, [s.size_bytes / 1000 for s in stages], 0.4, color=colours, label="on disk")
    ax.bar(x + 0.2, [s.zipped_bytes / 1000 for s in stages], 0.4, color=colours, alpha=0.45, hatch="//",
           label="zipped")
    for i, s in enumerate(stages):
        ax.text(i - 0.2, s.size_bytes / 1000, f"{s.size_bytes / 1000:.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(100, color="grey", ls="--", lw=1)
    ax.text(len(stages) - 0.5, 100, "100 KB", color="grey", fontsize=8, ha="right", va="bottom")
    ax.set_xticks(x, names, fontsize=9)
    ax.set_ylabel("KB")
    ax.set_title("Size")
    ax.legend(fontsize=8)

    ax = fig.add_subplot(charts[1])
    psnr = [s.target_psnr_db for s in stages]
    if all(p is not None for p in psnr):
        ax.bar(x, psnr, color=colours)
        lo = min(psnr) - 1.0
        ax.set_ylim(lo, max(psnr) + 0.6)
        ax.axhline(psnr[0] - 0.3, color="grey", ls="--", lw=1)
        ax.text(len(stages) - 0.5, psnr[0] - 0.3, "original - 0.3 dB", color="grey", fontsize=8, ha="right",
                va="top")
        for i, p in enumerate(psnr):
            ax.text(i, p, f"{p:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("dB vs targets")
        ax.set_title("PSNR against targets")
    else:
        fid = [s.fidelity_psnr_db if s.fidelity_psnr_db not in (None, float("inf")) else 0 for s in stages]
        ax.bar(x, fid, color=colours)
        ax.set_ylabel("dB vs original model")
        ax.set_title("Fidelity (no targets)")
    ax.set_xticks(x, names, fontsize=9)

    ax = fig.add_subplot(charts[2])
    lat = [s.latency_ms or 0 for s in stages]
    ax.bar(x, lat, color=colours)
    for i, s in enumerate(stages):
        if s.latency_ms:
            ax.text(i, s.latency_ms, f"{s.latency_ms:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, fontsize=9)
    ax.set_ylabel("ms, batch 1")
    ax.set_title("Inference time (engines differ: see table)", fontsize=10)

    for r, (name, images) in enumerate(examples):
        for c, (img, col) in enumerate(zip(images, columns)):
            a = fig.add_subplot(gs[1 + r, c])
            a.imshow(img)
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(col, fontsize=10)
            if c == 0:
                a.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, format="png", dpi=72)
    plt.close(fig)
