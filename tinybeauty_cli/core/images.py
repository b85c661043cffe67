"""Folders of images and of (input, target) pairs, preprocessing, and the built-in test set."""

from __future__ import annotations

import inspect
import os
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import synthetic
from .errors import ImageError
from .files import require_file
from .progress import Progress, SilentProgress

#: The suffixes listed in messages; a folder is read for every suffix Pillow can open (:func:`image_suffixes`).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Folder-name pairs recognised as (input, target).
PAIR_DIRS = (("input", "target"), ("before", "after"))
#: Larger images are refused as possible decompression bombs: Pillow's own limit (about 89 MP; a
#: 48 MP phone photo is well below it), which its warning enforces as soon as a header is read.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 16384 * 16384


@dataclass
class ImageSet:
    """Model-size images as uint8 (N, S, S, 3); ``targets`` is None for unpaired folders."""

    names: list[str]
    inputs: np.ndarray
    targets: np.ndarray | None
    source: str  # e.g. "built-in synthetic test set (100 pairs, seed 20240901)"

    def __len__(self) -> int:
        return len(self.names)

    @property
    def has_targets(self) -> bool:
        return self.targets is not None


def read_image(path: Path) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, or raise :class:`ImageError` naming it.

    RGBA/LA/P-with-transparency are composited onto white; 16-bit and 32-bit grey
    (I;16, I, F) are scaled to 8 bits, not clipped; EXIF orientation is applied.
    """
    return _read(Path(path), decode=True)


def check_image(path: Path) -> None:
    """Refuse, from its header alone (nothing decoded), a file that is no image Pillow reads or is too
    large: a folder's unreadable files are named before any of it is decoded."""
    _read(Path(path), decode=False)


def _read(path: Path, decode: bool) -> Image.Image | None:
    require_file(path, "image", ImageError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"image {path} is {im.width}x{im.height}: too large "
                                     f"(possible decompression bomb, limit {MAX_PIXELS:,} pixels)")
                if not decode:
                    return None
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {path} refused as a possible decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError,
            ZeroDivisionError, MemoryError) as exc:  # what Pillow's decoders raise on damaged data
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ImageError(f"image {path} is corrupt or truncated ({reason})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        a = np.maximum(a, 0.0)
        top = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        if mode == "I" and a.max() <= 65535:
            top = 65535.0 if a.max() > 255 else 255.0
        if mode == "F":
            top = 1.0 if a.max() <= 1.0 else 255.0
        g = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g] * 3, axis=-1), "RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "La":  # premultiplied: Pillow converts it only to LA
        im, mode = im.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "RGBa", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "LAB":  # Pillow has no direct LAB -> RGB conversion; its colour-management module does
        from PIL import ImageCms  # noqa: PLC0415 - only for the rare LAB image

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                            "LAB", "RGB")
        return ImageCms.applyTransform(im, transform)
    return im.convert("RGB")


#: Formats Pillow identifies but does not decode here (Ghostscript, video, metadata only).
_NOT_DECODED = frozenset({"EPS", "MPEG", "IPTC"})


def _decodes(fmt: str) -> bool:
    factory = Image.OPEN[fmt][0]
    stub = inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile)  # HDF5, GRIB, WMF, ...
    return not stub and fmt not in _NOT_DECODED


@lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """Every file suffix of a format Pillow decodes (its registered readers), lower case."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and _decodes(fmt))


def center_square(im: Image.Image) -> Image.Image:
    side = min(im.size)
    left = (im.width - side) // 2
    top = (im.height - side) // 2
    return im.crop((left, top, left + side, top + side))


def to_model_size(im: Image.Image, size: int) -> np.ndarray:
    """Center square crop, bicubic resize to ``size`` x ``size``; uint8 (S, S, 3)."""
    sq = center_square(im)
    if sq.size != (size, size):
        sq = sq.resize((size, size), Image.BICUBIC)
    return np.asarray(sq, dtype=np.uint8)


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise ImageError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise ImageError(f"{folder} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ImageError(f"folder {folder} is not readable (permission denied)")
    suffixes = image_suffixes() | set(IMAGE_SUFFIXES)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _pair_dirs(folder: Path) -> tuple[Path, Path] | None:
    for a, b in PAIR_DIRS:
        if (folder / a).is_dir() and (folder / b).is_dir():
            return folder / a, folder / b
    return None


def load_folder(folder: Path, size: int, limit: int | None = None) -> ImageSet:
    """A folder of images, or of pairs (``input``/``target`` or ``before``/``after`` matched by stem)."""
    folder = Path(folder)
    pairs = _pair_dirs(folder) if folder.is_dir() else None
    if pairs is not None:
        in_dir, tg_dir = pairs
        ins = {p.stem: p for p in list_images(in_dir)}
        tgs = {p.stem: p for p in list_images(tg_dir)}
        only_in = sorted(set(ins) - set(tgs))
        only_tg = sorted(set(tgs) - set(ins))
        if only_in or only_tg:
            parts = []
            if only_in:
                parts.append(f"{len(only_in)} input(s) without a target (e.g. {only_in[0]})")
            if only_tg:
                parts.append(f"{len(only_tg)} target(s) without an input (e.g. {only_tg[0]})")
            raise ImageError(f"{folder}: unmatched pairs: " + "; ".join(parts),
                             hint=f"inputs in {in_dir.name}/ and targets in {tg_dir.name}/ are matched by file name stem")
        stems = sorted(ins)[: limit if limit else None]
        if not stems:
            raise ImageError(f"{in_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for s in stems:
            check_image(ins[s])
            check_image(tgs[s])
        inputs = np.stack([to_model_size(read_image(ins[s]), size) for s in stems])
        targets = np.stack([to_model_size(read_image(tgs[s]), size) for s in stems])
        return ImageSet(stems, inputs, targets, f"{folder} ({len(stems)} pairs, {in_dir.name}/{tg_dir.name})")
    files = list_images(folder)[: limit if limit else None]
    if not files:
        raise ImageError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                         hint="or give it input/ and target/ subfolders of pairs")
    for p in files:
        check_image(p)
    inputs = np.stack([to_model_size(read_image(p), size) for p in files])
    return ImageSet([p.stem for p in files], inputs, None, f"{folder} ({len(files)} images, no targets)")


def read_unlabeled(folder: Path, size: int, count: int | None = None) -> tuple[ImageSet | None, list[str], int]:
    """Up to ``count`` images of a folder (of pairs: the inputs) for training or calibration, skipping
    the files that cannot be read (they are not scored, so the rest serves as well).

    Returns the images (None when none is readable), the names of the skipped files and how many
    image files the folder holds; raises :class:`ImageError` for a missing folder or a file.
    """
    folder = Path(folder)
    if folder.is_dir() and not list_images(folder):
        for a, _b in PAIR_DIRS:
            if (folder / a).is_dir():
                folder = folder / a
                break
    files = list_images(folder)
    arrays, names, skipped = [], [], []
    for path in files:
        if count is not None and len(arrays) >= count:
            break
        try:
            arrays.append(to_model_size(read_image(path), size))
            names.append(path.stem)
        except ImageError:
            skipped.append(path.name)
    if not arrays:
        return None, skipped, len(files)
    return ImageSet(names, np.stack(arrays), None, f"{folder} ({len(arrays)} images)"), skipped, len(files)


_BUILTIN: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # a few sizes, drawn once per process


def _builtin(size: int, count: int, progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    if (size, count) not in _BUILTIN:
        with (progress or SilentProgress()).task("building the built-in test set", total=count) as advance:
            bare, made = synthetic.portraits(synthetic.TEST_SEED, count, size, on_each=advance)
        bare.setflags(write=False)
        made.setflags(write=False)
        if len(_BUILTIN) >= 4:
            _BUILTIN.pop(next(iter(_BUILTIN)))
        _BUILTIN[(size, count)] = (bare, made)
    return _BUILTIN[(size, count)]


def builtin_test_set(size: int = 256, limit: int | None = None, progress: Progress | None = None) -> ImageSet:
    """The built-in test set: 100 synthetic (bare, made-up) pairs from a fixed seed (drawn once per
    process; ``progress`` reports the drawing)."""
    count = min(limit or synthetic.TEST_COUNT, synthetic.TEST_COUNT)
    bare, made = _builtin(size, count, progress)
    return ImageSet([f"synthetic_{i:03d}" for i in range(count)], bare, made,
                    f"built-in synthetic test set ({count} pairs, seed {synthetic.TEST_SEED})")


def synthetic_unlabeled(count: int, size: int = 256, seed: int = synthetic.TRAIN_SEED + 1,
                        progress: Progress | None = None) -> ImageSet:
    """Unlabeled synthetic portraits (calibration / distillation), never the test set's seed."""
    with (progress or SilentProgress()).task("drawing synthetic portraits", total=count) as advance:
        bare = synthetic.bare_portraits(seed, count, size, on_each=advance)
    return ImageSet([f"portrait_{i:03d}" for i in range(count)], bare, None,
                    f"synthetic portraits ({count}, seed {seed})")


def load_images(data: Path | None, size: int, limit: int | None = None,
                progress: Progress | None = None) -> ImageSet:
    """``--data`` as every command reads it: a folder, or (None) the built-in test set."""
    if limit is not None and limit < 1:
        raise ImageError(f"--limit must be >= 1, got {limit}")
    if data is None:
        return builtin_test_set(size, limit, progress)
    return load_folder(Path(data), size, limit)


def uint8_to_model(batch: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], or in a model's own ``value_range``."""
    x = (np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(np.float32) / 127.5) - 1.0
    lo, hi = value_range
    if (lo, hi) != (-1.0, 1.0):
        x = (x + 1.0) / 2.0 * (hi - lo) + lo
    return x


def model_to_uint8(batch: np.ndarray) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded."""
    batch = np.asarray(batch)
    out = np.empty((batch.shape[0], *batch.shape[2:], batch.shape[1]), np.uint8)
    for i in range(0, len(batch), 8):  # a few images at a time: float64 temporaries stay in the CPU cache
        x = (np.asarray(batch[i:i + 8], np.float64) + 1.0) * 127.5
        out[i:i + 8] = np.clip(np.round(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return out
