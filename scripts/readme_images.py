"""Make the pictures README.md shows, from real runs of the tool.

    python scripts/readme_images.py [--run-dir optimized_model]

* ``docs/demo_portrait.png``: the demo portrait (``assets/demo_portrait.png``, test pair 0) before,
  made up by the demo checkpoint (``tbopt apply``), and its target.
* ``docs/optimization_results.png``: a copy of the picture ``tbopt run`` wrote into ``--run-dir``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinybeauty_cli.core.images import builtin_test_set  # noqa: E402


def labelled(img: np.ndarray, text: str) -> Image.Image:
    im = Image.fromarray(img)
    canvas = Image.new("RGB", (im.width, im.height + 22), "white")
    canvas.paste(im, (0, 22))
    ImageDraw.Draw(canvas).text((6, 5), text, fill="black")
    return canvas


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "optimized_model")
    args = ap.parse_args()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)

    pair = builtin_test_set(256, limit=1)
    before = np.asarray(Image.open(ROOT / "assets" / "demo_portrait.png").convert("RGB"))
    assert np.array_equal(before, pair.inputs[0]), "assets/demo_portrait.png is no longer test pair 0"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "tinybeauty_cli", "apply", str(ROOT / "tinybeauty_cli" / "core" / "assets" / "tinybeauty_demo.pt"),
                        str(ROOT / "assets" / "demo_portrait.png"), "-o", tmp, "--quiet"], check=True)
        after = np.asarray(Image.open(Path(tmp) / "demo_portrait.png").convert("RGB"))
    tiles = [labelled(before, "before (input)"), labelled(after, "after: tbopt apply (demo checkpoint)"),
             labelled(pair.targets[0], "target")]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 8
    strip.save(docs / "demo_portrait.png", optimize=True)
    print(f"wrote {docs / 'demo_portrait.png'}")

    figure = args.run_dir / "optimization_results.png"
    if figure.is_file():
        shutil.copyfile(figure, docs / "optimization_results.png")
        print(f"wrote {docs / 'optimization_results.png'} (from {figure})")
    else:
        print(f"no {figure}: run `tbopt run` first for docs/optimization_results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
