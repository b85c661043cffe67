"""``tbopt optimize``'s report: which candidates are on the Pareto front, ``search.md`` and
``pareto.png`` (size vs quality and latency vs quality, every candidate, the front drawn, the
chosen files marked, the budget line).

Candidates come in as the plain dicts of ``search.json`` (``recipe``, ``size_bytes``,
``quality_db``, ``latency_ms``, ``kept`` ...), so this module needs nothing from the search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which points no other point beats: lower ``x`` (size, latency) and higher ``y`` (quality).

    A point is dominated when another is at least as good on both axes and better on one.
    """
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def replay_text(t: dict[str, Any]) -> str:
    """One target of a replay: the recipe, its size and quality, and whether it was searched (and why)."""
    made = (f"{t['recipe']}" + (f", {t['size_bytes']:,} B" if t.get("size_bytes") is not None else "")
            + (f", {t['quality_db']:.2f} dB" if t.get("quality_db") is not None else "")) if t.get("recipe") else ""
    if t["status"] == "replayed":
        return f"replayed {made} (within the budget)"
    said = "searched" if t["status"] == "searched" else "not chosen"
    return f"{said}: {t['reason']}" + (f" [{made}]" if made else "")


def search_markdown(result: Mapping[str, Any]) -> str:
    """``search.md``: the chosen file per target beside the original, its commands, every candidate."""
    quality = result["quality_axis"]
    lines = ["# tbopt optimize", "", f"Command: `{result['command']}`", "",
             f"Budget: {result['budget']['description']}.", "", "## Chosen", "",
             f"| target | file | size (B) | zipped (B) | {quality} (dB) | fidelity (dB) | latency (ms) | recipe |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    o = result["original"]
    lines.append(f"| original | `{o['file']}` | {o['size_bytes']:,} | {o['zipped_bytes']:,} | "
                 f"{_fmt(o['quality_db'])} | ref | {_fmt(o.get('latency_ms'))} | - |")
    for target, c in result["chosen"].items():
        if c.get("file") is None:
            lines.append(f"| {target} | none within the budget | | | | | | |")
            continue
        lines.append(f"| {target} | `{c['file']}` | {c['size_bytes']:,} | {c['zipped_bytes']:,} | "
                     f"{_fmt(c['quality_db'])} | {_fmt(c['fidelity_psnr_db'])} | {_fmt(c.get('latency_ms'))} | "
                     f"{c['recipe']['key']} |")
    hashes = [f"- {target}: `{c['sha256']}`" for target, c in result["chosen"].items() if c.get("sha256")]
    if hashes:
        lines += ["", "SHA-256 of each chosen file, checked on the written copy before it was renamed into place:", "", *hashes]
    lines += ["", "Commands that rebuild each chosen file (same weights and graph):", ""]
    for target, c in result["chosen"].items():
        if c.get("commands"):
            lines += [f"{target}:", "", "```bash", *c["commands"], "```", ""]
    lines += ["## Every candidate", "",
              f"| recipe | size (B) | zipped (B) | {quality} (dB) | fidelity (dB) | latency (ms) | engine | "
              "within budget | Pareto front | seconds |",
              "|---|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for c in result["candidates"]:
        lines.append(f"| {c['recipe']['key']} | {c['size_bytes']:,} | {c['zipped_bytes']:,} | {_fmt(c['quality_db'])} | "
                     f"{_fmt(c['fidelity_psnr_db'])} | {_fmt(c.get('latency_ms'))} | {c.get('engine') or '-'} | "
                     f"{'yes' if c['kept'] else 'no'} | {'yes' if c['pareto'] else 'no'} | {c['seconds']:.1f} |")
    if result.get("models"):
        lines += ["", "## Float models made on the way", "",
                  f"| model | {quality} (dB) | fidelity (dB) | within budget | seconds |", "|---|---:|---:|---|---:|"]
        for m in result["models"]:
            lines.append(f"| {m['key']} | {_fmt(m['quality_db'])} | {_fmt(m['fidelity_psnr_db'])} | "
                         f"{'yes' if m['kept'] else 'no'} | {m['seconds']:.1f} |")
    for title, key in (("Skipped (a cheaper step of the branch missed the budget, or it could not beat a kept file)",
                        "skipped"), ("Not tried (time budget)", "not_tried")):
        if result.get(key):
            lines += ["", f"## {title}", ""] + [f"- {s['key']}: {s['reason']}" + (
                f" (expected {s['expected_s']:.0f} s, {s['left_s']:.0f} s left)" if "expected_s" in s else "")
                for s in result[key]]
    use = result.get("images_use") or {}
    if use:
        show = (lambda v: ", ".join(v) if isinstance(v, list) else str(v))
        lines += ["", "## Which images served which purpose", "", f"- scored for the budget: {show(use['scored'])}",
                  f"- distillation, GPTQ and int8 calibration: {show(use['calibration'])}"]
    if result.get("replay"):
        lines += ["", "## Replayed recipes", "", f"From `{result['replay']['from']}`:", ""]
        lines += [f"- {target}: {replay_text(t)}" for target, t in result["replay"]["targets"].items()]
    if result.get("stopped"):
        lines += ["", "## Why the search stopped", "", result["stopped"]]
    if result.get("cost_model"):
        lines += ["", "## Cost model (measured on this run)", "", "| work | seconds per unit | units |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {v['seconds_per_unit']:.3f} | {v['units']:g} |" for k, v in result["cost_model"].items()]
    lines += ["", result["caption"], ""]
    return "\n".join(lines)


def pareto_figure(result: Mapping[str, Any], path: Path) -> None:
    """``pareto.png``: size vs quality (Core ML and int8 files) and latency vs quality (int8 files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = result["quality_axis"]
    line = result["budget"]["line_db"]
    cands = [c for c in result["candidates"] if c["quality_db"] is not None]
    chosen = {c["recipe"]["key"] for c in result["chosen"].values() if c.get("file")}
    targets = list(dict.fromkeys(c["recipe"]["target"] for c in cands))
    colours = dict(zip(targets, ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)

    def panel(ax: Any, xkey: str, xlabel: str, scale: float, only: list[str] | None) -> None:
        for t in targets:
            if only is not None and t not in only:
                continue
            pts = [c for c in cands if c["recipe"]["target"] == t and c.get(xkey) is not None]
            if not pts:
                continue
            ax.scatter([c[xkey] / scale for c in pts], [c["quality_db"] for c in pts], s=22, color=colours[t],
                       alpha=0.55, label=t)
            front = sorted((c for c in pts if c["pareto"]), key=lambda c: c[xkey])
            ax.step([c[xkey] / scale for c in front], [c["quality_db"] for c in front], where="post",
                    color=colours[t], lw=1.2)
            for c in pts:
                if c["recipe"]["key"] in chosen:
                    ax.scatter([c[xkey] / scale], [c["quality_db"]], s=180, marker="*", color=colours[t],
                               edgecolor="black", zorder=5)
                    # each target's label on its own line above the stars: chosen files of
                    # different targets often sit side by side just over the budget line
                    rank = targets.index(t)
                    ax.annotate(f"{t}: " + c["recipe"]["model_key"] + " " + c["recipe"]["storage"],
                                (c[xkey] / scale, c["quality_db"]), fontsize=7, xytext=(6, 8 + 11 * rank),
                                textcoords="offset points", color=colours[t],
                                arrowprops=dict(arrowstyle="-", color=colours[t], lw=0.6))
        o = result["original"]
        ox = o.get(xkey)
        if ox is not None and o["quality_db"] is not None:
            ax.scatter([ox / scale], [o["quality_db"]], s=60, marker="D", color="black", label="original")
        ax.axhline(line, color="grey", ls="--", lw=1)
        ax.text(ax.get_xlim()[1], line, " budget", color="grey", fontsize=8, ha="right", va="bottom")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{quality} (dB)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")  # the budget line's label is at the right
        else:
            ax.text(0.5, 0.5, "no candidate for this panel", transform=ax.transAxes, ha="center", color="grey")

    panel(axes[0], "size_bytes", "size on disk (KB)", 1000.0, None)
    axes[0].set_xscale("log")
    axes[0].set_title("Size vs quality: every candidate, front per target, chosen = star")
    load = result.get("load_average")
    load_words = "" if load is None else f", load average {load:.2f} on {result.get('cpus')} cores"
    panel(axes[1], "latency_ms", f"latency (ms, batch 1, {result['threads']} threads{load_words})", 1.0, ["cpu"])
    axes[1].set_title("Latency vs quality: int8 TorchScript files (CPU)")
    fig.suptitle(f"tbopt optimize: {Path(result['checkpoint']).name}, {result['data']}", fontsize=11)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
