"""What quantization decided, as data: per-layer decisions, per-engine trials, and the outcome of
:func:`~tinybeauty_cli.quantize.transform.quantize_module` (the JSON shapes of ``tbopt quantize``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .graph_rewrites import RewriteReport


def rounded(v: float | None, nd: int = 3) -> float | None:
    """``v`` rounded for reports; None and infinities as they are."""
    if v is None:
        return None
    v = float(v)
    return v if math.isinf(v) else round(v, nd)


@dataclass
class LayerDecision:
    name: str  # as in the float model (e.g. "upconv2.conv")
    kind: str  # module type, e.g. "Conv2d"
    quantized: bool
    alone_fidelity_db: float | None = None  # fidelity with only this layer in int8 (sensitivity)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alone_fidelity_db"] = rounded(self.alone_fidelity_db)
        return d


@dataclass
class BackendTrial:
    backend: str
    status: str  # "chosen" | "meets target" | "misses target" | "skipped" | "excluded"
    note: str = ""
    all_int8_latency_ms: float | None = None
    latency_ms: float | None = None
    fidelity_db: float | None = None  # on the calibration subset, with its kept-float layers
    kept_float: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("all_int8_latency_ms", "latency_ms", "fidelity_db"):
            d[k] = rounded(d[k])
        return d


class LayerSplit:
    """``quantized_layers`` / ``float_layers`` of anything holding per-layer ``layers`` decisions."""

    layers: list[LayerDecision]

    @property
    def quantized_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.quantized]

    @property
    def float_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.quantized]


@dataclass
class QuantizeOutcome(LayerSplit):
    """What :func:`~tinybeauty_cli.quantize.transform.quantize_module` decided and measured on the
    calibration images (nothing here comes from the evaluation images)."""

    backend: str
    backend_reason: str
    engine: str  # a label such as "PyTorch int8 x86 (TorchScript)"
    backends: list[BackendTrial]
    rewrites: RewriteReport
    layers: list[LayerDecision]
    keep_float_steps: list[dict[str, Any]]
    calibration_fidelity_db: float  # fidelity of the chosen model on the sensitivity images
    sensitivity_images: int
    macs: int  # of the rewritten float graph (what the int8 model computes)
    stored_weights: int  # weights of the rewritten graph
    timings: dict[str, float] = field(default_factory=dict)  # calibration_s, keep_float_s, backend_selection_s
    notes: list[str] = field(default_factory=list)
    ranking: dict[str, Any] = field(default_factory=dict)  # how engines were compared: threads, runs, float ms
