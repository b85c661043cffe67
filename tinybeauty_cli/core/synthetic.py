"""Procedural face-like portraits and a deterministic makeup transform.

No public makeup data set is reachable from where tbopt is built, so the demo and
the built-in test set are generated here. Portraits are drawn with numpy only
(varied skin tone, face shape, position and tilt, eyes, brows, nose shading, lips,
hair, background, texture noise and lighting); the makeup (lipstick, blush, eye
shadow, eyeliner, mild skin smoothing) is one fixed style, so it is a function of
the bare portrait that a network can learn: localized colour changes, everything
else preserved.

Everything is a function of ``(seed, index, size)`` through numpy's PCG64
generator and plain float arithmetic, so the same call gives the same pixels on
any run and machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Seed of the built-in 100-pair test set. Training uses other seeds.
TEST_SEED = 20240901
TEST_COUNT = 100
#: Seed of the demo checkpoint's training pairs (distinct from the test set).
TRAIN_SEED = 7

_SKIN = np.array(
    [
        [250, 222, 200], [236, 196, 168], [224, 178, 142], [198, 146, 108],
        [170, 118, 84], [130, 86, 58], [98, 64, 44],
    ],
    dtype=np.float32,
)
_HAIR = np.array(
    [[25, 20, 18], [60, 40, 28], [105, 70, 40], [160, 120, 70], [210, 180, 120], [120, 40, 25], [140, 140, 140]],
    dtype=np.float32,
)
_IRIS = np.array([[70, 45, 25], [40, 90, 150], [60, 110, 60], [110, 80, 40], [30, 30, 35]], dtype=np.float32)

# The makeup style: fixed, so that the transform is learnable from the portrait.
LIPSTICK = np.array([176, 24, 52], dtype=np.float32)
BLUSH = np.array([236, 96, 120], dtype=np.float32)
SHADOW = np.array([120, 60, 130], dtype=np.float32)
LINER = np.array([20, 12, 16], dtype=np.float32)


@dataclass(frozen=True)
class Portrait:
    """A bare portrait and its made-up version, both uint8 (H, W, 3); ``made_up`` is None when only
    the bare portrait was drawn."""

    bare: np.ndarray
    made_up: np.ndarray | None


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, soft: float) -> np.ndarray:
    """Soft mask of an ellipse in (u, v) coordinates: 1 inside, 0 outside, ``soft`` = edge width."""
    d = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    return _smoothstep((1.0 - d) / soft + 0.5)


def _gauss(u: np.ndarray, v: np.ndarray, cu: float, cv: float, su: float, sv: float) -> np.ndarray:
    return np.exp(-0.5 * (((u - cu) / su) ** 2 + ((v - cv) / sv) ** 2))


def _blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable binomial-like blur with edge replication (numpy only, deterministic)."""
    k = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32)
    k /= k.sum()
    out = img
    for _ in range(radius):
        for axis in (0, 1):
            pad = [(0, 0)] * out.ndim
            pad[axis] = (2, 2)
            p = np.pad(out, pad, mode="edge")
            n = out.shape[axis]
            acc = np.zeros_like(out)
            for i, w in enumerate(k):
                acc += w * np.take(p, np.arange(i, i + n), axis=axis)
            out = acc
    return out


def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    pos = np.linspace(0.0, cells, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _blend(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1.0 - a) + colour * a


def portrait(seed: int, index: int, size: int = 256, bare_only: bool = False) -> Portrait:
    """Draw portrait ``index`` of the family ``seed`` at ``size`` x ``size``.

    ``bare_only`` skips the makeup (about half the work): the bare portrait is the same either way,
    since the makeup draws nothing from the random generator."""
    rng = np.random.default_rng([seed, index])
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy = (yy + 0.5) / s
    xx = (xx + 0.5) / s

    # --- background: two-colour gradient plus soft blotches
    c1, c2 = rng.uniform(20, 235, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    img += 18.0 * _lowfreq(rng, size, 4)[..., None]

    # --- face geometry (normalised units), with tilt
    cx = 0.5 + rng.uniform(-0.07, 0.07)
    cy = 0.50 + rng.uniform(-0.05, 0.07)
    fa = rng.uniform(0.23, 0.29)  # half width
    fb = fa * rng.uniform(1.22, 1.42)  # half height
    tilt = np.deg2rad(rng.uniform(-12, 12))
    cos_t, sin_t = np.cos(tilt), np.sin(tilt)
    u = (xx - cx) * cos_t + (yy - cy) * sin_t  # face-aligned coordinates
    v = -(xx - cx) * sin_t + (yy - cy) * cos_t

    skin_pos = rng.uniform(0, len(_SKIN) - 1)
    lo = int(np.floor(skin_pos))
    hi = min(lo + 1, len(_SKIN) - 1)
    skin = _SKIN[lo] * (1 - (skin_pos - lo)) + _SKIN[hi] * (skin_pos - lo)
    skin = skin * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    hair_col = _HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.85, 1.15)

    # --- shoulders / neck
    neck = _ellipse(u, v, 0.0, fb * 1.05, fa * 0.45, fb * 0.55, 0.15)
    shoulders = _ellipse(u, v, 0.0, fb * 2.15, fa * 2.2, fb * 0.95, 0.08)
    cloth = rng.uniform(20, 235, 3).astype(np.float32)
    img = _blend(img, cloth, shoulders)
    img = _blend(img, skin * 0.82, neck)

    # --- hair behind the face
    hair_len = rng.uniform(0.9, 1.6)
    hair = _ellipse(u, v, 0.0, -fb * 0.05 + 0.25 * fb * (hair_len - 1), fa * 1.28, fb * 1.1 * hair_len ** 0.5, 0.06)
    hair = hair * (v < fb * (0.2 + 0.8 * (hair_len - 0.9))).astype(np.float32)
    streaks = 0.12 * np.sin(u * s * rng.uniform(0.8, 1.6) + 3.0 * _lowfreq(rng, size, 6))
    img = _blend(img, hair_col * (1.0 + streaks)[..., None], hair)

    # --- face with lighting
    face = _ellipse(u, v, 0.0, 0.0, fa, fb, 0.05)
    light_dir = rng.uniform(-1, 1)
    shade = 1.0 + 0.16 * light_dir * (u / fa) - 0.10 * ((u / fa) ** 2 + (v / fb) ** 2)
    shade += 0.05 * _lowfreq(rng, size, 5)
    skin_img = skin * shade[..., None]
    # nose shading: a soft vertical shadow on the lit side's opposite, and nostrils
    nose_side = -np.sign(light_dir) if light_dir != 0 else 1.0
    nose = _gauss(u, v, nose_side * fa * 0.10, fb * 0.12, fa * 0.05, fb * 0.20)
    skin_img = skin_img * (1.0 - 0.16 * nose)[..., None]
    nostrils = _gauss(u, v, -fa * 0.11, fb * 0.27, fa * 0.035, fb * 0.02) + _gauss(u, v, fa * 0.11, fb * 0.27, fa * 0.035, fb * 0.02)
    skin_img = skin_img * (1.0 - 0.35 * np.clip(nostrils, 0, 1))[..., None]
    img = _blend(img, skin_img, face)

    # --- fringe of hair over the forehead
    fringe = _ellipse(u, v, rng.uniform(-0.3, 0.3) * fa, -fb * 1.0, fa * 1.1, fb * rng.uniform(0.25, 0.45), 0.1)
    img = _blend(img, hair_col * (1.0 + streaks)[..., None], fringe * face)

    # --- eyes, irises, brows
    eye_y = -fb * rng.uniform(0.10, 0.18)
    eye_dx = fa * rng.uniform(0.36, 0.44)
    eye_a = fa * rng.uniform(0.16, 0.21)
    eye_b = eye_a * rng.uniform(0.42, 0.55)
    iris_col = _IRIS[rng.integers(len(_IRIS))]
    gaze = rng.uniform(-0.3, 0.3) * eye_a
    brow_col = hair_col * 0.8
    brow_thick = rng.uniform(0.018, 0.032)
    eyes = np.zeros_like(u)
    for side in (-1.0, 1.0):
        ex = side * eye_dx
        eye = _ellipse(u, v, ex, eye_y, eye_a, eye_b, 0.25)
        eyes = np.maximum(eyes, eye)
        img = _blend(img, np.array([238, 236, 232], np.float32), eye)
        iris = _ellipse(u, v, ex + gaze, eye_y, eye_b * 0.95, eye_b * 0.95, 0.2) * eye
        img = _blend(img, iris_col, iris)
        pupil = _ellipse(u, v, ex + gaze, eye_y, eye_b * 0.42, eye_b * 0.42, 0.3) * eye
        img = _blend(img, np.array([12, 10, 10], np.float32), pupil)
        # brow: an arc above the eye
        bu = (u - ex) / (eye_a * 1.35)
        arc = eye_y - eye_b * 2.4 - 0.02 * (1 - bu ** 2)
        brow = _smoothstep((brow_thick - np.abs(v - arc)) / 0.008) * _smoothstep((1 - np.abs(bu)) / 0.2)
        img = _blend(img, brow_col, 0.85 * brow)

    # --- lips
    mouth_y = fb * rng.uniform(0.50, 0.58)
    mouth_a = fa * rng.uniform(0.30, 0.42)
    lip_h = fb * rng.uniform(0.05, 0.075)
    lip_col = skin * np.array([0.86, 0.58, 0.60], np.float32) * rng.uniform(0.9, 1.05)
    upper = _ellipse(u, v, 0.0, mouth_y - lip_h * 0.45, mouth_a, lip_h * 0.75, 0.25)
    lower = _ellipse(u, v, 0.0, mouth_y + lip_h * 0.55, mouth_a * 0.85, lip_h, 0.25)
    lips = np.maximum(upper, lower)
    img = _blend(img, lip_col, lips)
    seam = _smoothstep((lip_h * 0.12 - np.abs(v - mouth_y)) / 0.004) * _smoothstep((1 - np.abs(u / mouth_a)) / 0.2)
    img = img * (1.0 - 0.45 * seam)[..., None]

    # --- texture noise (fine grain + mottling)
    grain = rng.normal(0.0, 2.6, (size, size, 1)).astype(np.float32)
    img = img + grain + 4.0 * _lowfreq(rng, size, 24)[..., None]
    bare = np.clip(np.round(img), 0, 255)
    if bare_only:
        return Portrait(bare.astype(np.uint8), None)

    # --- makeup, a fixed style applied where the features are
    mk = bare.astype(np.float32)
    skin_mask = face * (1.0 - np.clip(eyes * 1.5, 0, 1)) * (1.0 - lips) * (1.0 - fringe)
    mk = _blend(mk, _blur(mk, 2), 0.55 * skin_mask)  # mild skin smoothing
    for side in (-1.0, 1.0):
        ex = side * eye_dx
        shadow = _ellipse(u, v, ex, eye_y - eye_b * 1.1, eye_a * 1.2, eye_b * 1.5, 0.6) * (1.0 - _ellipse(u, v, ex, eye_y, eye_a, eye_b, 0.25))
        mk = _blend(mk, SHADOW, 0.5 * shadow * face)
        lid = np.abs(np.sqrt(((u - ex) / eye_a) ** 2 + ((v - eye_y) / eye_b) ** 2) - 1.08)
        liner = _smoothstep((0.22 - lid) / 0.12) * (v < eye_y + eye_b * 0.1)
        mk = _blend(mk, LINER, 0.8 * liner)
        blush = _gauss(u, v, side * fa * 0.55, fb * 0.22, fa * 0.18, fb * 0.12)
        mk = _blend(mk, BLUSH, 0.45 * blush * face * (1.0 - lips))
    lum = mk.mean(axis=-1, keepdims=True) / 255.0
    mk = _blend(mk, LIPSTICK * (0.55 + 0.6 * lum), 0.8 * lips)
    made_up = np.clip(np.round(mk), 0, 255)
    return Portrait(bare.astype(np.uint8), made_up.astype(np.uint8))


def portraits(seed: int, count: int, size: int = 256, start: int = 0,
              on_each: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pairs as two uint8 arrays (N, H, W, 3): (bare, made_up); ``on_each()`` after each."""
    bare = np.empty((count, size, size, 3), np.uint8)
    made = np.empty_like(bare)
    for i in range(count):
        p = portrait(seed, start + i, size)
        bare[i], made[i] = p.bare, p.made_up
        if on_each is not None:
            on_each()
    return bare, made


def bare_portraits(seed: int, count: int, size: int = 256, start: int = 0,
                   on_each: Callable[[], None] | None = None) -> np.ndarray:
    """The bare portraits of :func:`portraits` alone (uint8, (N, H, W, 3)), for unlabeled images."""
    bare = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        bare[i] = portrait(seed, start + i, size, bare_only=True).bare
        if on_each is not None:
            on_each()
    return bare
