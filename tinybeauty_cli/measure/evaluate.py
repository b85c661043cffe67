"""Score a model on an image set: PSNR against targets and fidelity against a reference.

Conventions every command shares:

* **PSNR against targets** is computed on the made-up image as an app would save it
  (rounded to 8 bits) against the 8-bit target, per image, then averaged (dB).
* **Fidelity** compares two models' made-up images in float, before rounding (range
  [-1, 1], so peak-to-peak 2), per image then averaged: rounding would hide
  differences below half a grey level, and identical outputs would read as infinite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..core.fingerprint import weights_fingerprint
from ..core.images import ImageSet, model_to_uint8, uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.quality import fidelity_psnr_db, mean_psnr_db, worst_fidelity_db
from ..core.runner import Runner
from ..core.sanity import require_finite_output


def target_psnr_db(outputs: np.ndarray, targets_u8: np.ndarray) -> float:
    """Mean PSNR of made-up float outputs (N, 3, S, S) in [-1, 1] against uint8 targets (N, S, S, 3)."""
    return mean_psnr_db(model_to_uint8(outputs), targets_u8)


@dataclass
class Evaluation:
    outputs: np.ndarray  # float (N, 3, S, S) made-up images in [-1, 1]
    target_psnr_db: float | None  # None when the images have no targets
    do_nothing_psnr_db: float | None  # the input itself scored against the targets
    fidelity_psnr_db: float | None  # against the reference outputs, when given
    worst_fidelity_db: float | None

    def figures(self) -> dict[str, float | None]:
        return {
            "target_psnr_db": _r(self.target_psnr_db),
            "do_nothing_psnr_db": _r(self.do_nothing_psnr_db),
            "fidelity_psnr_db": _r(self.fidelity_psnr_db),
            "worst_fidelity_db": _r(self.worst_fidelity_db),
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 3)


def score_outputs(outputs: np.ndarray, images: ImageSet, reference: np.ndarray | None = None) -> Evaluation:
    """Score made-up outputs already computed on ``images``: nothing is run again."""
    tgt = dn = fid = worst = None
    if images.targets is not None:
        tgt = target_psnr_db(outputs, images.targets)
        dn = mean_psnr_db(images.inputs, images.targets)
    if reference is not None:
        fid = fidelity_psnr_db(outputs, reference)
        worst = worst_fidelity_db(outputs, reference)
    return Evaluation(outputs, tgt, dn, fid, worst)


def evaluate(runner: Runner, images: ImageSet, reference: np.ndarray | None = None,
             progress: Progress | None = None, description: str = "scoring") -> Evaluation:
    """Run ``runner`` on every image (batched) and score it."""
    progress = progress or SilentProgress()
    x = uint8_to_model(images.inputs)
    with progress.task(description, total=len(x)) as advance:
        outputs = runner.predict_all(x, on_batch=advance)
    require_finite_output(runner.label, outputs, images.image_labels())  # a NaN would score as a number, silently
    return score_outputs(outputs, images, reference)


def model_key(key: object, runner: Runner) -> tuple:
    """What a model's outputs on an image set depend on: its weights (a fingerprint, so that a model
    changed in place -- distilled, fitted onto palettes, refit -- is another model), how the runner
    feeds and reads it (its class and preprocessing) and the engine.

    A key that is not a PyTorch module, nor a runner of one (a Core ML runner: its weights were
    read from its file and nothing edits them in memory), is kept by identity.
    """
    module = key if isinstance(key, nn.Module) else getattr(key, "module", None)
    weights = weights_fingerprint(module) if isinstance(module, nn.Module) else f"object {id(key)}"
    return (weights, type(runner).__qualname__, repr(getattr(runner, "preprocessing", None)),
            getattr(runner, "engine", None), getattr(runner, "quantized_engine", None))


class Scores:
    """Each model run once on one image set; every later score of it is computed from its outputs.

    ``tbopt run`` scores the same models in several stages (a stage's own report, then the final
    table): keyed by the model's weights (:func:`model_key`), the second request costs nothing,
    and a model whose weights changed since is run again.

    ``keep``: the outputs of at most this many models are kept besides the first one scored (the
    reference the others are compared with), the most recently used; a search that scores dozens of
    models on a hundred images at full size would otherwise hold gigabytes of outputs.
    """

    def __init__(self, images: ImageSet, progress: Progress | None = None, keep: int | None = None):
        self.images = images
        self.progress = progress or SilentProgress()
        self.keep = keep
        self._outputs: dict[tuple, tuple[object, np.ndarray]] = {}
        self._first: tuple | None = None

    def outputs(self, key: object, runner: Runner, description: str) -> np.ndarray:
        """The made-up images of the model ``key`` (run through ``runner`` the first time only)."""
        memo_key = model_key(key, runner)
        hit = self._outputs.pop(memo_key, None)
        if hit is None:
            outputs = evaluate(runner, self.images, progress=self.progress, description=description).outputs
            # the key object is kept so that an identity key stays unique while it is here
            hit = (key, outputs)
            self._first = memo_key if self._first is None else self._first
        self._outputs[memo_key] = hit  # the most recently used last
        if self.keep is not None and len(self._outputs) > self.keep + 1:
            del self._outputs[next(k for k in self._outputs if k != self._first)]
        return hit[1]

    def score(self, key: object, runner: Runner, description: str, reference: np.ndarray | None = None) -> Evaluation:
        return score_outputs(self.outputs(key, runner, description), self.images, reference)
