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
