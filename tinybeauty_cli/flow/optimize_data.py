"""Which images serve which purpose in ``tbopt optimize``: the images the budget is scored on
(``--data``) and the unlabeled images the models are distilled, GPTQ-calibrated and int8-calibrated
on (``--calib``). The two never overlap: when ``--calib`` is the ``--data`` folder, the folder is split
(every fourth image by name, at least one, is scored; the rest calibrate) and each part copied into
the search's own folder, so the budget is never scored on an image a model learnt from.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.images import ImageSet, list_images, load_images
from ..core.progress import Progress

#: One image in this many (sorted by name) is scored when --calib is the --data folder.
SCORED_EVERY = 4


@dataclass
class DataUse:
    """The scored images, the calibration folder the search reads, and what to say about them."""

    images: ImageSet
    calib: Path | None  # None: synthetic portraits
    scored: list[str] = field(default_factory=list)  # file names, when --data is a folder
    calibration: list[str] = field(default_factory=list)  # file names, when --calib is a folder
    notes: list[str] = field(default_factory=list)
    split: bool = False  # --calib was the --data folder, split in two
    synthetic_calibration: bool = False  # --data holds photos, and the models learnt from synthetic portraits

    def to_dict(self) -> dict[str, Any]:
        return {"scored": self.scored or self.images.source,
                "calibration": self.calibration or ("synthetic portraits" if self.calib is None else str(self.calib)),
                "split_from_data": self.split}


def data_use(data: Path | None, calib: Path | None, size: int, limit: int | None, scratch: Path) -> DataUse:
    """The images of a search (see the module docstring); ``scratch`` holds the two parts of a split."""
    if data is not None and calib is not None and Path(data).resolve() == Path(calib).resolve():
        return _split(Path(data), size, limit, scratch)
    images = load_images(data, size, limit)
    use = DataUse(images, calib, scored=[p.name for p in list_images(data)] if _plain(data) else [],
                  calibration=[p.name for p in list_images(calib)] if _plain(calib) else [])
    if data is not None and images.targets is None and calib is None:
        use.synthetic_calibration = True
        use.notes.append(
            f"--data {data} holds photos and no --calib was given: the models were distilled, GPTQ palettes "
            f"and int8 calibrated on synthetic portraits, not on faces like yours; pass --calib with photos "
            f"(it may be the --data folder itself: tbopt then scores the budget on a part it never calibrates on)")
    return use


def _plain(folder: Path | None) -> bool:
    return folder is not None and Path(folder).is_dir() and any(list_images(Path(folder)))


def _split(folder: Path, size: int, limit: int | None, scratch: Path) -> DataUse:
    files = sorted(list_images(folder), key=lambda p: p.name)
    if len(files) < 2:
        raise UsageError(f"--calib is the --data folder {folder}, which holds {len(files)} image(s): a split needs "
                         f"at least 2 (one scored, the rest for calibration)", hint="give --calib another folder")
    scored, calibration = files[::SCORED_EVERY], [p for i, p in enumerate(files) if i % SCORED_EVERY]
    parts = {}
    for name, part in (("scored", scored), ("calib", calibration)):
        target = scratch / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for p in part:
            shutil.copy2(p, target / p.name)
        parts[name] = target
    images = load_images(parts["scored"], size, limit)
    return DataUse(images, parts["calib"], [p.name for p in scored], [p.name for p in calibration],
                   [f"--calib is the --data folder: {len(scored)} of its {len(files)} images are scored for the "
                    f"budget and the other {len(calibration)} calibrate (distillation, GPTQ, int8); none serves both"],
                   split=True)


#: Synthetic portraits a distilled model is scored on to measure what calibrating on them cost on the photos.
GAP_PORTRAITS = 16


def calibration_gap(search: Any, use: DataUse, progress: Progress) -> str | None:
    """When the models learnt from synthetic portraits but the budget is scored on photos: the
    fidelity of the longest-distilled pruned model to the original on synthetic portraits (what it
    was distilled on) and on the photos, in one sentence; None when no pruned model was made."""
    from ..runtime.runners import TorchRunner  # noqa: PLC0415 - torch, only when there is a gap to measure
    from ..measure.evaluate import evaluate  # noqa: PLC0415
    from .prune import unlabeled_images  # noqa: PLC0415

    made = [m for m in search.models if "channel" in m.key and "sparse" not in m.key and m.fidelity_psnr_db is not None]
    if not use.synthetic_calibration or not made:
        return None
    entry = max(made, key=lambda m: (_steps(m.key), m.fidelity_psnr_db))
    model = search.maker.known_model(entry.key)[0]
    original = search.original
    portraits = unlabeled_images(None, original.preprocessing.size, GAP_PORTRAITS, progress)
    portraits = ImageSet(portraits.names, portraits.inputs, None, portraits.source, portraits.labels)
    ref = evaluate(TorchRunner(original.module.eval(), original.preprocessing), portraits, progress=progress,
                   description="scoring the original on synthetic portraits")
    ev = evaluate(TorchRunner(model.module.eval(), model.preprocessing), portraits, reference=ref.outputs,
                  progress=progress, description=f"scoring {entry.key} on synthetic portraits")
    gap = ev.fidelity_psnr_db - entry.fidelity_psnr_db
    return (f"measured: {entry.key} reproduces the original at {ev.fidelity_psnr_db:.1f} dB on {len(portraits)} "
            f"synthetic portraits like those it was distilled on, and at {entry.fidelity_psnr_db:.1f} dB on the "
            f"--data photos ({gap:+.1f} dB{': calibrating on photos can win that back' if gap > 0.5 else ''})")


def _steps(model_key: str) -> int:
    """Distillation steps in a model key (``channel0.3x750+1250`` -> 2000)."""
    steps = model_key.split("x", 1)[1].split("+sparse")[0] if "x" in model_key else "0"
    return sum(int(part) for part in steps.split("+") if part.isdigit())
