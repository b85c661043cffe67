"""Apply a model to photos, as the authors' demo does.

The photo is resized to the model's size, the network's residual is resized back
to the photo's full resolution (bilinear) and added there, so a 256x256 network
makes up a photo of any size. With ``model_size=True`` the output is instead the
model-size made-up image of the photo's centre square.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import InputError
from ..core.files import atomic_output, check_output
from ..core.images import model_to_uint8, read_image, to_model_size, uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.quality import made_up, psnr_db
from ..core.runner import Runner
from ..core.sanity import require_finite_output


@dataclass
class AppliedImage:
    input: str
    output: str
    width: int
    height: int
    mean_abs_change: float  # mean |output - input| in 8-bit levels
    psnr_vs_input_db: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _resize_channels(residual: np.ndarray, width: int, height: int) -> np.ndarray:
    """(3, S, S) float -> (height, width, 3) float, bilinear per channel (Pillow mode F)."""
    chans = [np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((width, height), Image.BILINEAR))
             for c in residual]
    return np.stack(chans, axis=-1)


def makeup_full_resolution(runner: Runner, photo: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) photo -> made-up uint8 photo at the same resolution."""
    h, w = photo.shape[:2]
    s = runner.size
    small = np.asarray(Image.fromarray(photo).resize((s, s), Image.BICUBIC), np.uint8)
    x = uint8_to_model(small[None])
    residual = runner.residual(x)
    require_finite_output(runner.label, residual)
    residual = residual[0]
    full = photo.astype(np.float32) / 127.5 - 1.0 + _resize_channels(residual, w, h)
    return np.clip(np.round((np.clip(full, -1.0, 1.0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def makeup_model_size(runner: Runner, photo: np.ndarray) -> np.ndarray:
    """uint8 photo -> made-up uint8 (S, S, 3) image of its centre square."""
    x = uint8_to_model(to_model_size(Image.fromarray(photo), runner.size)[None])
    residual = runner.residual(x)
    require_finite_output(runner.label, residual)
    return model_to_uint8(made_up(x, residual))[0]


def output_paths(images: list[Path], out_dir: Path) -> list[Path]:
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise InputError(f"{p} and {stems[p.stem]} would both be written as {p.stem}.png",
                             hint="apply them in two runs with different -o folders")
        stems[p.stem] = p
    return [out_dir / f"{p.stem}.png" for p in images]


def apply_makeup(runner: Runner, images: list[Path], out_dir: Path, *, model_size: bool = False,
                 force: bool = False, progress: Progress | None = None) -> list[AppliedImage]:
    """Make up every image and write ``OUTDIR/<stem>.png``; all checks happen before any write."""
    progress = progress or SilentProgress()
    if not images:
        raise InputError("no images given")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output folder {out_dir} is a file")
    outs = [check_output(dst, force, inputs=(src,)) for src, dst in zip(images, output_paths(images, out_dir))]
    photos = [np.asarray(read_image(p)) for p in images]  # every input is readable before we write
    results = []
    with progress.task("applying", total=len(images)) as advance:
        for src, dst, photo in zip(images, outs, photos):
            made = makeup_model_size(runner, photo) if model_size else makeup_full_resolution(runner, photo)
            with atomic_output(dst, force=force) as tmp:
                Image.fromarray(made).save(tmp, format="PNG")
            ref = photo if not model_size else to_model_size(Image.fromarray(photo), runner.size)
            diff = np.abs(made.astype(np.float64) - ref.astype(np.float64))
            results.append(AppliedImage(str(src), str(dst), made.shape[1], made.shape[0],
                                        float(diff.mean()), float(psnr_db(made, ref)[0])))
            advance(1)
    return results
