"""tbopt optimize never scores its budget on an image it calibrated on: --calib may be the --data folder,
which is then split; photos without --calib are named in the result."""

from __future__ import annotations

import json
import re

import pytest

from tinybeauty_cli.flow.optimize import optimize
from tinybeauty_cli.flow.optimize_data import data_use

from tests.helpers import small_space


def test_calib_as_the_data_folder_is_split_and_the_parts_never_overlap(tiny, tmp_path):
    d, _ckpt = tiny
    use = data_use(d / "faces", d / "faces", 32, None, tmp_path / "split")
    assert use.split and len(use.scored) == 1 and len(use.calibration) == 3
    assert not set(use.scored) & set(use.calibration)
    assert sorted(use.scored + use.calibration) == sorted(p.name for p in (d / "faces").iterdir())
    assert len(use.images.inputs) == 1 and use.images.names == [n.rsplit(".", 1)[0] for n in use.scored]
    assert sorted(p.name for p in use.calib.iterdir()) == sorted(use.calibration)  # what calibration reads


def test_photos_without_calib_are_named_and_the_result_says_which_images_served(tiny, tmp_path):
    d, ckpt = tiny
    alone = data_use(d / "faces", None, 32, None, tmp_path / "unused")
    assert alone.notes and "synthetic portraits" in alone.notes[0]
    assert data_use(d / "pairs", None, 32, None, tmp_path / "unused").notes == []  # targets: no photos
    out = tmp_path / "out"
    result = optimize(ckpt, out, small_space(data=d / "faces", calib=d / "faces", time_budget_min=1e-6))
    saved = json.loads((out / "search.json").read_text())
    assert saved["images_use"]["split_from_data"] is True
    assert not set(saved["images_use"]["scored"]) & set(saved["images_use"]["calibration"])
    assert any("none serves both" in n for n in result.notes)
    assert "--calib" in saved["command"] and str(d / "faces") in saved["command"]
    assert "Which images served which purpose" in (out / "search.md").read_text()


def test_photos_without_calib_get_the_measured_gap_between_portraits_and_photos(tiny, tmp_path):
    """The note carries a figure measured on this run: the distilled model's fidelity to the original on
    synthetic portraits (what it learnt from) and on the --data photos."""
    d, ckpt = tiny
    result = optimize(ckpt, tmp_path / "out", small_space(data=d / "faces", min_fidelity_db=1.0, palettes=("pal4",),
                                                          rates=(0.5,), finetune_steps=(4,)))
    measured = [n for n in result.notes if re.search(r"measured: channel0\.5\S*x4 reproduces the original at", n)]
    assert len(measured) == 1, result.notes
    portraits, photos = [float(x) for x in re.findall(r"at ([-\d.]+) dB", measured[0])]
    key = measured[0].split()[1]
    model = next(m for m in result.models if m.key == key)
    assert photos == pytest.approx(model.fidelity_psnr_db, abs=0.06) and portraits > 0
    assert "16 synthetic portraits" in measured[0]
    with_calib = optimize(ckpt, tmp_path / "out2", small_space(data=d / "faces", calib=d / "faces", min_fidelity_db=1.0,
                                                               palettes=("pal4",), rates=(0.5,), finetune_steps=(4,)))
    assert not any("measured: channel" in n for n in with_calib.notes)
