"""``tbopt compare``: two artifacts on the same images, side by side."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.contexts import torch_threads
from ..core.errors import ConfigError, InputError
from ..core.files import atomic_output, check_output
from ..core.images import load_images, model_to_uint8
from ..core.progress import Progress, SilentProgress
from ..core.quality import fidelity_per_image_db
from ..core.runner import Runner
from ..runtime.runners import TorchRunner, open_runner
from ..runtime.timing import Latency
from .bench import BenchConfig, time_runner
from .describe import describe
from .evaluate import evaluate


@dataclass(frozen=True)
class CompareConfig:
    data: Path | None = None
    limit: int | None = None
    runs: int = 30
    warmup: int = 5
    threads: int | None = None
    worst: int = 3  # images shown in the PNG

    def __post_init__(self) -> None:
        BenchConfig(self.data, self.limit, self.runs, self.warmup, self.threads)  # same checks
        if self.worst < 1:
            raise ConfigError(f"--worst must be >= 1, got {self.worst}")

    def bench_config(self) -> BenchConfig:
        return BenchConfig(self.data, self.limit, self.runs, self.warmup, self.threads)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = str(self.data) if self.data else None
        return d


@dataclass
class LayerDiff:
    name: str
    shape_a: list[int] | None
    shape_b: list[int] | None
    max_abs: float | None
    rel_l2: float | None  # ||a - b|| / ||a||
    changed_fraction: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Side:
    path: str
    kind: str
    engine: str
    size_bytes: int
    zipped_bytes: int
    target_psnr_db: float | None
    latency: Latency | None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "latency"}
        d["latency"] = None if self.latency is None else self.latency.to_dict()
        return d


@dataclass
class CompareResult:
    a: Side
    b: Side
    images: int
    data_source: str
    psnr_between_mean_db: float
    psnr_between_worst_db: float
    worst_images: list[str]
    max_abs_diff_levels: float  # 8-bit levels, on the float outputs
    size_ratio: float  # b / a
    latency_ratio: float | None  # b / a
    layers: list[LayerDiff] | None
    figure: str | None
    config: CompareConfig
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.to_dict(), "b": self.b.to_dict(), "images": self.images, "data": self.data_source,
            "psnr_between_mean_db": round(self.psnr_between_mean_db, 3),
            "psnr_between_worst_db": round(self.psnr_between_worst_db, 3),
            "worst_images": self.worst_images, "max_abs_diff_levels": round(self.max_abs_diff_levels, 3),
            "size_ratio": round(self.size_ratio, 4),
            "latency_ratio": None if self.latency_ratio is None else round(self.latency_ratio, 4),
            "layers": None if self.layers is None else [l.to_dict() for l in self.layers],
            "figure": self.figure, "config": self.config.to_dict(), "notes": self.notes,
        }


def layer_differences(a: Runner, b: Runner) -> list[LayerDiff] | None:
    """Per-tensor weight differences of two float checkpoints (None for other kinds)."""
    if not (isinstance(a, TorchRunner) and isinstance(b, TorchRunner) and a.loaded and b.loaded
            and a.loaded.kind == "float" and b.loaded.kind == "float"):
        return None
    sa, sb = a.loaded.artifact.state_dict, b.loaded.artifact.state_dict
    diffs = []
    for name in list(sa) + [k for k in sb if k not in sa]:
        ta, tb = sa.get(name), sb.get(name)
        if ta is None or tb is None or tuple(ta.shape) != tuple(tb.shape) or not ta.is_floating_point():
            diffs.append(LayerDiff(name, None if ta is None else list(ta.shape),
                                   None if tb is None else list(tb.shape), None, None, None))
            continue
        d = (tb.double() - ta.double())
        norm = float(ta.double().norm())
        diffs.append(LayerDiff(name, list(ta.shape), list(tb.shape), float(d.abs().max()),
                               float(d.norm()) / norm if norm > 0 else float(d.norm()),
                               float((d != 0).double().mean())))
    return diffs


def compare(path_a: Path, path_b: Path, cfg: CompareConfig, *, out_dir: Path | None = None,
            force: bool = False, time_models: bool = True, progress: Progress | None = None,
            **open_options: Any) -> CompareResult:
    """Run both artifacts on the same images and compare outputs, sizes, speed and weights."""
    progress = progress or SilentProgress()
    figure_path = None
    if out_dir is not None:
        figure_path = Path(out_dir) / f"{Path(path_a).stem}_vs_{Path(path_b).stem}.png"
        figure_path = check_output(figure_path, force)
    ra, rb = open_runner(path_a, **open_options), open_runner(path_b, **open_options)
    if ra.size != rb.size:
        raise InputError(f"{Path(path_a).name} runs at {ra.size}px and {Path(path_b).name} at {rb.size}px: "
                          f"their outputs cannot be compared pixel for pixel")
    bcfg = cfg.bench_config()
    with torch_threads(bcfg.effective_threads):
        images = load_images(cfg.data, ra.size, cfg.limit, progress)
        ea = evaluate(ra, images, progress=progress, description=f"scoring {Path(path_a).name}")
        eb = evaluate(rb, images, progress=progress, description=f"scoring {Path(path_b).name}")
        la = lb = None
        if time_models:
            la = time_runner(ra, images.inputs[0], bcfg, progress, f"timing {Path(path_a).name}")
            lb = time_runner(rb, images.inputs[0], bcfg, progress, f"timing {Path(path_b).name}")
    per_image = fidelity_per_image_db(ea.outputs, eb.outputs)
    order = np.argsort(per_image, kind="stable")
    worst = order[: min(cfg.worst, len(order))]
    max_abs = float(np.abs(ea.outputs.astype(np.float64) - eb.outputs).max() * 127.5)
    ia, ib = describe(path_a, runner=ra), describe(path_b, runner=rb)
    sides = [Side(str(p), r.kind, r.engine, i["size_bytes"], i["zipped_bytes"], e.target_psnr_db, l)
             for p, r, i, e, l in ((path_a, ra, ia, ea, la), (path_b, rb, ib, eb, lb))]
    notes = [n for r in (ra, rb) for n in getattr(r, "notes", ())]
    if any(r.off_device for r in (ra, rb)):
        notes.append("a Core ML time here comes from tbopt's reference executor on this CPU, not from a device")
    if figure_path is not None:
        with atomic_output(figure_path, force=force) as tmp:
            worst_images_figure(images.inputs[worst], model_to_uint8(ea.outputs[worst]),
                                model_to_uint8(eb.outputs[worst]), [images.names[i] for i in worst],
                                per_image[worst], Path(path_a).name, Path(path_b).name, tmp)
    return CompareResult(
        a=sides[0], b=sides[1], images=len(images), data_source=images.source,
        psnr_between_mean_db=float(per_image.mean()), psnr_between_worst_db=float(per_image.min()),
        worst_images=[images.names[i] for i in worst], max_abs_diff_levels=max_abs,
        size_ratio=ib["size_bytes"] / ia["size_bytes"],
        latency_ratio=None if la is None else lb.p50_ms / la.p50_ms,
        layers=layer_differences(ra, rb), figure=None if figure_path is None else str(figure_path),
        config=cfg, notes=notes,
    )


def worst_images_figure(inputs: np.ndarray, out_a: np.ndarray, out_b: np.ndarray, names: list[str],
                        psnrs: np.ndarray, label_a: str, label_b: str, path: Path) -> None:
    """input | A | B | |A - B| amplified, one row per image, with a colour scale bar in 8-bit levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = np.abs(out_a.astype(np.int16) - out_b.astype(np.int16)).max(axis=-1)
    vmax = max(1, int(diff.max()))
    n = len(names)
    fig, axes = plt.subplots(n, 4, figsize=(12, 3.1 * n), squeeze=False, constrained_layout=True)
    im = None
    for r in range(n):
        for c, (img, title) in enumerate(((inputs[r], "input"), (out_a[r], label_a), (out_b[r], label_b))):
            axes[r, c].imshow(img)
            axes[r, c].set_title(title if r == 0 else "", fontsize=10)
        im = axes[r, 3].imshow(diff[r], cmap="magma", vmin=0, vmax=vmax)
        axes[r, 3].set_title(f"|A - B| amplified (full scale = {vmax} levels)" if r == 0 else "", fontsize=10)
        axes[r, 0].set_ylabel(f"{names[r]}\n{psnrs[r]:.1f} dB between", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes[:, 3], shrink=0.8, label="difference (8-bit levels, max over RGB)")
    fig.suptitle(f"{label_a} vs {label_b}: the {n} least similar images", fontsize=12)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
