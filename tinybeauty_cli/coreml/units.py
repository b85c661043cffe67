"""Which processors Core ML may use. No coremltools at import time: the CLI's options name these."""

from __future__ import annotations

from enum import Enum
from typing import Any

from ..core.errors import ConfigError


class ComputeUnits(str, Enum):
    """Which processors Core ML may use (chosen when a model is loaded, not stored in the file)."""

    all = "all"
    cpu = "cpu"
    cpu_gpu = "cpu-gpu"
    cpu_ne = "cpu-ne"

    def coreml(self) -> Any:
        from .spec import coremltools  # noqa: PLC0415 - coremltools only when Core ML runs

        ct = coremltools()
        return {"all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY,
                "cpu-gpu": ct.ComputeUnit.CPU_AND_GPU, "cpu-ne": ct.ComputeUnit.CPU_AND_NE}[self.value]


def parse_compute_units(value: str | ComputeUnits | None) -> ComputeUnits | None:
    if value is None or isinstance(value, ComputeUnits):
        return value
    try:
        return ComputeUnits(str(value).lower())
    except ValueError:
        choices = ", ".join(c.value for c in ComputeUnits)
        raise ConfigError(f"compute units must be one of {choices}, got {value!r}") from None
