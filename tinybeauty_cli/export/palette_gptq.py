"""GPTQ palettes (``tbopt export --weights palN --palette-method gptq``): the same k-means look-up
tables, with each weight's entry chosen and the tables' values set from calibration images, so the
file keeps the same bytes and op types as plain k-means palettes.

Plain palettes (:func:`~.palettes.kmeans_lut`) round every weight to its nearest table entry, which
minimizes the weights' own error. What matters is each layer's output: for a layer whose inputs X
(im2col patches of a convolution) have second moment ``H = X^T X``, the error is
``(W_q - W) H (W_q - W)^T``. Layer by layer, in the order a forward pass runs them (each layer's
inputs from the model whose earlier layers are already palettized):

1. GPTQ (Frantar et al., 2022): the input columns of the weight, largest ``H`` diagonal first, are
   rounded one at a time to their nearest table entry and the rounding error is spread over the
   columns not yet rounded through the Cholesky factor of ``H^-1``;
2. the table's values are refit by least squares on the same error, given the entries chosen;

then again from the new table (:data:`ROUNDS` rounds, the best kept). On the authors' released
checkpoint (4-bit tables per tensor, 16 synthetic portraits) this lifts fidelity on a real face
from 49.33 to 55.81 dB with the same weight bytes (``benchmarks/export_figures.py --only quant``).

Written here rather than taken from coremltools: ``coremltools.optimize.torch``'s GPTQ rounds onto a
uniform grid or its fixed normal-float palette scaled per channel (iOS18), not onto a fitted
table, and its ``LayerwiseCompressor`` runs only sequential models (TinyBeauty has skip
connections). Module in, module out: nothing here opens or writes a file or scores evaluation images.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.images import uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..coreml.weights import layers_in_run_order
from .palettes import PALETTIZED, kmeans_lut

#: Rounds of GPTQ rounding then table refit; the round with the lowest output error is kept.
ROUNDS = 3
#: GPTQ's dampening: this share of the Hessian's mean diagonal is added to its diagonal
#: (coremltools' ``ModuleGPTQConfig.hessian_dampening`` default).
DAMPENING = 0.01
#: Output positions per calibration image a layer's ``H`` is averaged over, drawn at random (fixed
#: seed): a 256x256 convolution has 65,536, and 8,192 bound the time with no loss measured.
HESSIAN_POSITIONS = 8192
#: Calibration images per forward pass.
_BATCH = 4


class _Captured(Exception):
    """Raised by the capture hook: the layer's inputs are read, the rest of the forward pass is not needed."""


@dataclass
class GptqReport:
    """What GPTQ palettes did. Output errors are each layer's ``|X (W_q - W)|^2 / |X W|^2`` on the
    calibration images (dB, mean over the layers GPTQ palettized), with plain k-means palettes and GPTQ's."""

    bits: int | dict[str, int]
    group_size: int | None
    layers: int  # palettized by GPTQ
    kmeans_layers: int  # layers GPTQ does not handle (transposed or grouped convolutions): plain k-means
    images: int
    output_error_kmeans_db: float | None = None
    output_error_gptq_db: float | None = None
    seconds: float = 0.0
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (k-means, GPTQ) relative

    def to_dict(self) -> dict[str, Any]:
        r = (lambda v: None if v is None else round(float(v), 2))
        return {"method": "gptq", "bits": self.bits if isinstance(self.bits, int) else list(self.bits.values()),
                "group_size": self.group_size, "layers": self.layers, "kmeans_layers": self.kmeans_layers,
                "calibration_images": self.images, "rounds": ROUNDS,
                "output_error_kmeans_db": r(self.output_error_kmeans_db),
                "output_error_gptq_db": r(self.output_error_gptq_db), "seconds": round(self.seconds, 2)}


def calibration_inputs(calibration: np.ndarray, value_range: tuple[float, float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as the model takes them: float (N, 3, H, W) in ``value_range``."""
    return torch.from_numpy(uint8_to_model(calibration, value_range))


def _handled(layer: nn.Module) -> bool:
    """Layers whose output is ``X W^T`` for im2col patches X that ``F.unfold`` gives."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (images, columns of W, positions)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    return F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)


def _hessian(model: nn.Module, layer: nn.Module, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Mean ``X^T X`` of the layer's inputs over the calibration images (float64)."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    count = 0

    def capture(_m: nn.Module, inputs: tuple, _out: Any) -> None:
        nonlocal total, count
        for cols in _patches(layer, inputs[0].detach()):
            if cols.shape[1] > HESSIAN_POSITIONS:
                cols = cols[:, torch.randperm(cols.shape[1], generator=generator)[:HESSIAN_POSITIONS]]
            cols = cols.double()
            total = total + cols @ cols.T / cols.shape[1]
            count += 1
        raise _Captured

    hook = layer.register_forward_hook(capture)
    try:
        with torch.no_grad():
            for i in range(0, len(images), _BATCH):
                try:
                    model(images[i:i + _BATCH])
                except _Captured:
                    pass
    finally:
        hook.remove()
    return total / max(count, 1)


def _output_error(w: torch.Tensor, h: torch.Tensor, wq: torch.Tensor) -> float:
    e = wq - w
    return float(torch.einsum("ci,ij,cj->", e, h, e))


def _gptq_round(w: torch.Tensor, h: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """GPTQ onto look-up tables: each row's entries in ``tables[rows[r]]`` (float64), columns in
    order of decreasing ``H`` diagonal, each rounding error spread over the columns after it."""
    w = w.clone()
    h = h.clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: any entry will do
    h[dead, dead] = 1
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += DAMPENING * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    row_tables = tables[rows]  # (rows, entries)
    idx = torch.empty(w.shape, dtype=torch.long)
    for j in range(w.shape[1]):
        k = (w[:, j:j + 1] - row_tables).abs().argmin(1)
        idx[:, j] = k
        err = (w[:, j] - row_tables.gather(1, k[:, None])[:, 0]) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return idx[:, torch.argsort(order)]


def _refit(w: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor
           ) -> torch.Tensor:
    """Each table's values minimizing the output error given the entries chosen: a least-squares
    problem of ``entries`` unknowns per table; entries no weight uses keep their value."""
    tables = tables.clone()
    entries = tables.shape[1]
    for g in range(len(tables)):
        sel = rows == g
        a = F.one_hot(idx[sel], entries).double()  # (rows of the group, columns, entries)
        m = torch.einsum("cia,ij,cjb->ab", a, h, a)
        b = torch.einsum("cia,ij,cj->a", a, h, w[sel])
        used = torch.diag(m) > 0
        if used.any():
            sub = m[used][:, used]
            sub += 1e-10 * torch.trace(sub) / len(sub) * torch.eye(len(sub), dtype=sub.dtype)
            tables[g, used] = torch.linalg.solve(sub, b[used])
    return tables


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Values as the file stores them (fp16 tables; an fp32 export keeps them exact)."""
    return t.to(torch.float16).to(torch.float64)


def _kmeans_tables(w: torch.Tensor, bits: int, rows: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain k-means tables (:func:`.palettes.kmeans_lut`, one per group of rows) and entries."""
    tables = torch.zeros(groups, 1 << bits, dtype=torch.float64)
    idx = torch.empty(w.shape, dtype=torch.long)
    for g in range(groups):
        sel = rows == g
        lut, ind = kmeans_lut(w[sel].numpy().astype(np.float16), bits)
        tables[g] = torch.from_numpy(lut.astype(np.float64))
        idx[sel] = torch.from_numpy(ind.astype(np.int64)).reshape(int(sel.sum()), -1)
    return tables, idx


def palettize_layer(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None = None
                    ) -> tuple[torch.Tensor, float, float]:
    """A weight (C_out, ...) snapped to ``2**bits``-entry tables (per tensor, or per ``group_size``
    output channels) by GPTQ and table refits on the input second moment ``h``.
    Returns (the snapped weight, relative output error with k-means tables, with GPTQ's)."""
    shape = w.shape
    w2 = w.reshape(shape[0], -1).double()
    group = math.gcd(shape[0], group_size) if group_size else shape[0]
    rows = torch.arange(shape[0]) // group
    tables, idx = _kmeans_tables(w2, bits, rows, shape[0] // group)
    scale = max(_output_error(w2, h, torch.zeros_like(w2)), 1e-30)
    kmeans_error = _output_error(w2, h, tables[rows].gather(1, idx))
    best = (kmeans_error, tables, idx)
    for _ in range(ROUNDS):
        idx = _gptq_round(w2, h, tables, rows)
        tables = _fp16(_refit(w2, h, idx, tables, rows))
        error = _output_error(w2, h, tables[rows].gather(1, idx))
        if error < best[0]:
            best = (error, tables, idx)
    error, tables, idx = best
    return tables[rows].gather(1, idx).reshape(shape).to(w.dtype), kmeans_error / scale, error / scale


def gptq_palettized(model: nn.Module, bits: int | Mapping[str, int], images: torch.Tensor, *,
                    group_size: int | None = None, seed: int = 0,
                    progress: Progress | None = None) -> tuple[nn.Module, GptqReport]:
    """A copy of ``model`` whose conv/linear weights take at most ``2**bits`` values each (per
    tensor, or per ``group_size`` output channels), chosen by GPTQ on ``images`` (float, as the
    model takes them). ``bits``: one size, or a size by layer name (``--bits-by-layer``). The
    export then stores these tables exactly (:func:`.palettes.kmeans_lut` keeps a tensor with no
    more distinct values than entries). ``model`` is left as is."""
    progress = progress or SilentProgress()
    t0 = time.perf_counter()
    student = copy.deepcopy(model).eval()
    names = {m: n for n, m in student.named_modules()}
    order = [m for m in layers_in_run_order(student, images[:1], PALETTIZED) if m in names]
    report = GptqReport(bits if isinstance(bits, int) else dict(bits), group_size, 0, 0, len(images))
    with progress.task("GPTQ palettes", total=len(order)) as advance:
        for k, layer in enumerate(order):
            name = names[layer]
            nbits = bits if isinstance(bits, int) else bits[name]
            w = layer.weight.detach()
            if _handled(layer):
                h = _hessian(student, layer, images, seed + k)
                snapped, before, after = palettize_layer(w, h, nbits, group_size)
                report.errors[name] = (before, after)
                report.layers += 1
            else:  # plain k-means, as the export would store it
                lut, ind = kmeans_lut(w.numpy().astype(np.float16), nbits)
                snapped = torch.from_numpy(lut[ind.astype(np.int64)]).reshape(w.shape).to(w.dtype)
                report.kmeans_layers += 1
            with torch.no_grad():
                layer.weight.copy_(snapped)
            advance(1)
    if report.errors:
        def db(i: int) -> float:
            return float(np.mean([10 * math.log10(max(e[i], 1e-30)) for e in report.errors.values()]))
        report.output_error_kmeans_db, report.output_error_gptq_db = db(0), db(1)
    report.seconds = time.perf_counter() - t0
    return student, report
