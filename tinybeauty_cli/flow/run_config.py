"""What ``tbopt run`` can be told, and the files it writes. No torch at import time: the CLI builds
its options and help text from this module."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..export.config import ExportConfig
from ..prune.config import PruneConfig
from ..quantize.config import QuantizeConfig

if TYPE_CHECKING:
    from ..measure.bench import BenchConfig

RUN_VERSION = 1

#: The files a run writes into its output folder, by role.
OUTPUT_FILES = {
    "pruned": "tinybeauty_pruned.pt",
    "quantized": "tinybeauty_optimized.pt",
    "mlmodel": "TinyBeauty.mlmodel",
    "mlpackage": "TinyBeauty.mlpackage",
    "json": "results.json",
    "markdown": "results.md",
    "figure": "optimization_results.png",
}

#: The rows of the original plan's table, and the file each one measures.
STAGES = (("Original", None), ("Pruned", "pruned"), ("Quantized", "quantized"), ("CoreML", "mlmodel"),
          ("CoreML package", "mlpackage"))

@dataclass(frozen=True)
class RunConfig:
    """Everything ``tbopt run`` can be told; ``to_dict`` goes into ``results.json``."""

    rate: float = 0.3
    method: str = "magnitude"  # the original plan's rule; "channel" for a smaller, faster network
    finetune_steps: int | None = None  # None: the pruning method's default
    weights: str = "int8"  # Core ML weight storage of TinyBeauty.mlmodel
    package_weights: str | None = None  # ... and of TinyBeauty.mlpackage (None: the same)
    data: Path | None = None  # images scored in the table (default: the built-in test set)
    calib: Path | None = None  # unlabeled images for channel ranking, distillation and int8 calibration
    limit: int | None = None
    calib_count: int = 32
    backend: str = "auto"  # int8 engine (tbopt quantize --backend)
    #: int8 fidelity to reach against the pruned float model. Higher than tbopt quantize's own
    #: default (45 dB): int8 noise adds to the model's own error, and on a model that scores
    #: ~39 dB against its targets, 45 dB of it costs ~0.3 dB there; 50 dB costs ~0.1 dB.
    min_psnr_db: float = 50.0
    threads: int | None = None
    runs: int = 30
    warmup: int = 5
    seed: int = 0
    #: A user's own network (``--arch package.module:Class``, ``--arch-kwargs``, ``--trust-pickle``).
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        # Each stage checks its own options; building them here refuses bad ones before any work.
        self.prune_config()
        self.quantize_config()
        self.export_config("mlmodel")
        self.export_config("mlpackage")
        self.bench_config()

    def prune_config(self) -> PruneConfig:
        return PruneConfig(rate=self.rate, method=self.method, finetune_steps=self.finetune_steps, seed=self.seed)

    def quantize_config(self) -> QuantizeConfig:
        return QuantizeConfig(backend=self.backend, calib=self.calib, calib_count=self.calib_count,
                              min_psnr_db=self.min_psnr_db, threads=self.threads,
                              runs=self.runs, warmup=self.warmup, eval_limit=self.limit)

    def export_config(self, role: str) -> ExportConfig:
        weights = self.weights if role == "mlmodel" else (self.package_weights or self.weights)
        return ExportConfig(format="neuralnetwork" if role == "mlmodel" else "mlprogram",
                            weights=None if weights == "fp16" else weights)

    def bench_config(self) -> "BenchConfig":
        from ..measure.bench import BenchConfig  # noqa: PLC0415 - torch; the CLI imports this module for --help

        return BenchConfig(data=self.data, limit=self.limit, runs=self.runs, warmup=self.warmup,
                           threads=self.threads)

    @property
    def effective_threads(self) -> int:
        import torch  # noqa: PLC0415 - the CLI imports this module for --help

        return self.threads or torch.get_num_threads()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "calib"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["finetune_steps"] = self.prune_config().steps
        d["package_weights"] = self.package_weights or self.weights
        d["threads"] = self.effective_threads
        d["version"] = RUN_VERSION
        return d

    def command_line(self, checkpoint: str, out: str) -> str:
        parts = [f"tbopt run {checkpoint} --output {out} --rate {self.rate:g} --method {self.method}",
                 f"--weights {self.weights}"]
        if self.package_weights:
            parts.append(f"--package-weights {self.package_weights}")
        if self.finetune_steps is not None:
            parts.append(f"--finetune-steps {self.finetune_steps}")
        for opt, name in (("--data", "data"), ("--calib", "calib"), ("--limit", "limit"), ("--threads", "threads"),
                          ("--calib-count", "calib_count"), ("--backend", "backend"),
                          ("--min-fidelity", "min_psnr_db"), ("--runs", "runs"), ("--warmup", "warmup")):
            value = getattr(self, name)
            if value != getattr(RunConfig, name):  # only what differs from the defaults
                parts.append(f"{opt} {value}")
        return " ".join(parts + [shlex.join(model_args(self.arch, self.arch_kwargs, self.trust_pickle))]).strip()

    def model_options(self) -> dict[str, Any]:
        """``load_model``'s keywords for the checkpoint."""
        return {"arch": self.arch, "arch_kwargs": self.arch_kwargs, "trust_pickle": self.trust_pickle}


def model_args(arch: str | None, arch_kwargs: str | None, trust_pickle: bool) -> list[str]:
    """The ``--arch``/``--arch-kwargs``/``--trust-pickle`` options that open a checkpoint again."""
    return ((["--arch", arch] if arch else []) + (["--arch-kwargs", arch_kwargs] if arch_kwargs else [])
            + (["--trust-pickle"] if trust_pickle else []))
