import numpy as np
from PIL import Image

from tinybeauty_cli.measure.report import StageFigures, results_figure, results_markdown


def _stages(with_targets=True):
    mk = lambda name, size, psnr, lat: StageFigures(name, f"{name}.x", "engine", size, size // 2,
                                                    psnr if with_targets else None, 60.0, lat)
    return [mk("Original", 341_000, 34.1, 45.0), mk("Pruned", 341_000, 34.0, 44.0),
            mk("Quantized", 120_000, 33.9, 20.0), mk("CoreML", 95_000, 34.0, 50.0)]


def test_results_markdown_has_one_row_per_stage():
    md = results_markdown(_stages(), "caption here")
    rows = [l for l in md.splitlines() if l.startswith("| ") and "Stage" not in l]
    assert [r.split("|")[1].strip() for r in rows] == ["Original", "Pruned", "Quantized", "CoreML"]
    assert "341.0" in md and "34.10" in md and "caption here" in md


def test_results_figure_draws_charts_and_faces(tmp_path):
    faces = [np.full((32, 32, 3), v, np.uint8) for v in (0, 50, 100, 150, 200, 250)]
    cols = ["input", "Original", "Pruned", "Quantized", "CoreML", "target"]
    for with_targets in (True, False):
        path = tmp_path / f"r{with_targets}.png"
        results_figure(_stages(with_targets), [("a", faces), ("b", faces)], cols, path, "title")
        im = Image.open(path)
        assert im.size[0] > 600 and im.size[1] > 400
