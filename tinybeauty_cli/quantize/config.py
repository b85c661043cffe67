"""What ``tbopt quantize`` can be told, and the constants its CLI shows. No torch at import time:
the CLI imports this module to build its options and help text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import ConfigError

QUANTIZE_VERSION = 1
TORCHSCRIPT_FORMAT = "tbopt-torchscript"
TORCHSCRIPT_FORMAT_VERSION = 1
BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")
#: Folder name of the records inside the written TorchScript archive.
ARCHIVE_FOLDER = "int8"
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)  # fixed, so that the same model gives the same bytes
#: Calibration images go through the network this many at a time.
CALIB_BATCH = 4
#: Calibration images of int8 (``tbopt quantize``, ``tbopt run``).
DEFAULT_CALIB_COUNT = 32
#: Timed runs when engines are ranked (the fastest run counts).
SELECTION_RUNS = 7
#: Calibration images whose conv outputs set the per-channel range equalization.
EQUALIZE_IMAGES = 8


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``tbopt quantize`` can be told; ``to_dict`` goes into the artifact history."""

    backend: str = "auto"
    calib: Path | None = None
    calib_count: int = DEFAULT_CALIB_COUNT
    keep_float: str | tuple[str, ...] = "auto"  # "auto" | "none" | layer names
    min_psnr_db: float = 45.0
    threads: int | None = None  # threads of use: engines ranked and latency measured at them (default: PyTorch's)
    runs: int = 30
    warmup: int = 5
    sensitivity_images: int = 8  # calibration images used to measure per-layer sensitivity
    eval_limit: int | None = None  # test images scored for the report (default: all 100)

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.calib_count < 1:
            raise ConfigError(f"--calib-count must be >= 1, got {self.calib_count}")
        if not (math.isfinite(self.min_psnr_db) and self.min_psnr_db > 0):
            raise ConfigError(f"--min-fidelity must be a positive number of dB, got {self.min_psnr_db}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.runs < 1 or self.warmup < 0 or self.sensitivity_images < 1:
            raise ConfigError("runs and sensitivity_images must be >= 1, warmup >= 0")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.eval_limit}")
        object.__setattr__(self, "keep_float", parse_keep_float(self.keep_float))
        if self.calib is not None:
            object.__setattr__(self, "calib", Path(self.calib))

    @property
    def effective_threads(self) -> int:
        import torch  # noqa: PLC0415 - imported when used, so that the CLI starts without torch

        return self.threads or torch.get_num_threads()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantizeConfig":
        """The inverse of :meth:`to_dict` (``version`` is checked; ``threads`` as recorded)."""
        d = dict(d)
        version = d.pop("version", QUANTIZE_VERSION)
        if version != QUANTIZE_VERSION:
            raise ConfigError(f"quantize configuration version {version} is not supported (this is {QUANTIZE_VERSION})")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown quantize configuration keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calib"] = str(self.calib) if self.calib else None
        d["keep_float"] = self.keep_float if isinstance(self.keep_float, str) else list(self.keep_float)
        d["threads"] = self.effective_threads
        d["version"] = QUANTIZE_VERSION
        return d


def parse_keep_float(value: str | Sequence[str]) -> str | tuple[str, ...]:
    """``"auto"``, ``"none"``, or a tuple of layer names from ``"a,b"`` / a sequence."""
    if isinstance(value, str):
        v = value.strip()
        if v.lower() in ("auto", "none"):
            return v.lower()
        names = [n.strip() for n in v.split(",")]
    else:
        names = [str(n).strip() for n in value]
    if not names or any(not n for n in names):
        raise ConfigError(f"--keep-float must be auto, none or a comma-separated list of layer names, got {value!r}")
    return tuple(dict.fromkeys(names))
