"""Measurements: PSNR, SSIM, parameter and MAC counts, latency."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn


def psnr_db(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """PSNR of each image of a batch (inf where identical). Layout does not matter."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


#: Identical images have infinite PSNR; averages cap each image here.
PSNR_CAP_DB = 150.0


def mean_psnr_db(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean over images of per-image PSNR (each capped at :data:`PSNR_CAP_DB`)."""
    return float(np.mean(np.minimum(psnr_db(a, b, data_range), PSNR_CAP_DB)))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, on each
    channel, averaged). ``a``, ``b``: (N, H, W, 3) or (N, 3, H, W) -- channels are
    detected as the axis of size 3 next to the batch axis or at the end."""
    ta = torch.as_tensor(np.asarray(a, np.float32))
    tb = torch.as_tensor(np.asarray(b, np.float32))
    if ta.ndim == 3:
        ta, tb = ta[None], tb[None]
    if ta.shape[-1] == 3 and ta.shape[1] != 3:
        ta, tb = ta.permute(0, 3, 1, 2), tb.permute(0, 3, 1, 2)
    c = ta.shape[1]
    g = torch.exp(-0.5 * ((torch.arange(11, dtype=torch.float64) - 5) / 1.5) ** 2)
    g = (g / g.sum()).float()
    # The 2-D Gaussian window is the outer product of two 1-D ones: filtering by rows, then by
    # columns, gives the same sums with 22 instead of 121 multiplications per pixel.
    rows = g.view(1, 1, 11, 1).expand(c, 1, 11, 1).contiguous()
    cols = g.view(1, 1, 1, 11).expand(c, 1, 1, 11).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, rows, groups=c), cols, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(ta), filt(tb)
    # (Co)variances do not change with a shift: computing them from data centred on each image's
    # mean keeps E[x^2] - E[x]^2 free of float32 cancellation (within 1e-6 of a float64 SSIM).
    ca = ta - ta.mean(dim=(2, 3), keepdim=True)
    cb = tb - tb.mean(dim=(2, 3), keepdim=True)
    mca, mcb = filt(ca), filt(cb)
    saa = filt(ca * ca) - mca**2
    sbb = filt(cb * cb) - mcb**2
    sab = filt(ca * cb) - mca * mcb
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return m.double().mean(dim=(1, 2, 3)).numpy()


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    total = nonzero = 0
    for p in module.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def count_macs(module: nn.Module, size: int, channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass at ``size`` x ``size`` (PyTorch's flop counter / 2).

    Dense MACs: zeros of unstructured pruning are still multiplied by a dense kernel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, channels, size, size)
    was_training = module.training
    module.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return int(counter.get_total_flops() // 2)


@dataclass
class Latency:
    """Per-call latency in milliseconds after warm-up."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    threads: int

    @property
    def images_per_second(self) -> float:
        return 1000.0 / self.p50_ms if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's CPU threads set to ``threads`` (None: unchanged) inside the block, restored after."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_latency(fn: Callable[[], object], runs: int = 30, warmup: int = 5,
                    threads: int | None = None, on_run: Callable[[], None] | None = None) -> Latency:
    """Call ``fn`` ``warmup`` times, then time ``runs`` calls; median and 90th percentile.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (restored after).
    """
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    with torch_threads(threads):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
            if on_run is not None:
                on_run()
        used = torch.get_num_threads()
    return _latency(times, warmup, used)


def _latency(times_ms: list[float], warmup: int, threads: int) -> Latency:
    ts = sorted(times_ms)
    p90 = ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]
    return Latency(statistics.median(ts), p90, statistics.fmean(ts), ts[0], len(ts), warmup, threads)


def measure_latencies(fns: dict[str, Callable[[], object]], runs: int = 30, warmup: int = 5,
                      threads: int | None = None) -> dict[str, Latency]:
    """:func:`measure_latency` for several functions with their runs interleaved (A, B, A, B, ...).

    On a shared machine the load changes from second to second; interleaving makes every
    function see the same conditions, so their ratio is fair even when absolute times drift.
    """
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    with torch_threads(threads):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000.0)
        used = torch.get_num_threads()
    return {name: _latency(ts, warmup, used) for name, ts in times.items()}
