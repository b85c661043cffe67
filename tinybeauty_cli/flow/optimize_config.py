"""What ``tbopt optimize`` can be told, the recipes it tries, the quality budget, and the ``tbopt``
commands that rebuild a recipe's file. No torch here: the CLI builds its options from this module.

A :class:`Recipe` is one candidate file: the channel-pruning rate and distillation length of the
float model, optional zeroed weights stored sparse, and how its weights are stored for one
target (a Core ML weight mode, or int8 TorchScript for ``cpu``). Its :meth:`Recipe.commands`
are the ``tbopt prune`` / ``tbopt export`` / ``tbopt quantize`` chain that makes the same file.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import UsageError
from ..export.config import ExportConfig
from ..prune.config import PruneConfig, PruneMethod
from ..quantize.config import QuantizeConfig
from .run_config import model_args

OPTIMIZE_VERSION = 2
#: Where each target's chosen file goes, inside ``--out``.
TARGET_FILES = {
    "ios13": "TinyBeauty.mlmodel",
    "ios16": "TinyBeauty-ios16.mlpackage",
    "ios17": "TinyBeauty-ios17.mlpackage",
    "ios18": "TinyBeauty-ios18.mlpackage",
    "cpu": "tinybeauty_cpu_int8.pt",
}
TARGETS = tuple(TARGET_FILES)
DEFAULT_TARGETS = ("ios13", "cpu", "ios16")
#: ``--time-budget`` when none is given (minutes); ``--time-budget 0`` lifts it.
DEFAULT_TIME_BUDGET_MIN = 10.0
#: The search's own files inside ``--out``; the cache keeps every candidate for ``--resume``.
REPORT_FILES = {"json": "search.json", "markdown": "search.md", "figure": "pareto.png"}
CACHE_DIR = ".tbopt-search"
#: Core ML weight modes, largest first: a branch stops at the first that misses the budget.
PALETTES = ("pal8", "pal6", "pal4", "pal3", "pal2")
#: Palettes an ML Program stores only from iOS 18 on.
IOS18_PALETTES = ("pal3",)


def coreml_target(target: str) -> str:
    """``ios16`` -> ``iOS16`` (export's spelling)."""
    return "iOS" + target[3:]


@dataclass(frozen=True)
class Recipe:
    """One candidate: how the float model is made, and how it is stored for ``target``."""

    target: str  # one of TARGETS
    rate: float = 0.0  # channel pruning rate (0: the model as given)
    steps: int = 0  # distillation steps after channel pruning
    sparsity: float = 0.0  # share of weights zeroed (global magnitude) and stored sparse
    weights: str = "fp16"  # Core ML weight mode, or "int8" for cpu
    fit_steps: int = 0  # palettes fitted for this many steps before palettizing (0: plain k-means)
    bits_by_layer: bool = False  # palette bits chosen per layer within the bytes of ``weights`` everywhere
    #: The channel groups of the full-resolution convs (``full_res``, found on the original) pruned at
    #: this rate instead of ``rate`` (``tbopt prune --group-rate``); 0: every group at ``rate``.
    full_res_rate: float = 0.0
    full_res: tuple[str, ...] = ()
    #: Palette entries chosen by GPTQ and tables refit on calibration images (``--palette-method gptq``).
    gptq: bool = False
    #: The distillation continued from this many steps (the same rate's shorter one) up to ``steps``
    #: (``tbopt prune --continue-from``); 0: distilled from the start.
    from_steps: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        object.__setattr__(self, "rate", float(self.rate))
        object.__setattr__(self, "full_res_rate", float(self.full_res_rate))
        object.__setattr__(self, "full_res", tuple(self.full_res) if self.full_res_rate else ())
        object.__setattr__(self, "sparsity", float(self.sparsity))

    @property
    def is_cpu(self) -> bool:
        return self.target == "cpu"

    @property
    def model_key(self) -> str:
        """The float model this recipe stores: the pruning part of :attr:`key`."""
        full_res = f"-fullres{self.full_res_rate:g}" if self.full_res_rate else ""
        steps = f"{self.from_steps}+{self.steps - self.from_steps}" if self.from_steps else str(self.steps)
        parts = [f"channel{self.rate:g}{full_res}x{steps}" if self.rate else "original"]
        if self.sparsity:
            parts.append(f"sparse{self.sparsity:g}")
        return "+".join(parts)

    @property
    def storage(self) -> str:
        return (self.weights + ("+gptq" if self.gptq else "") + ("+bits" if self.bits_by_layer else "")
                + (f"+fit{self.fit_steps}" if self.fit_steps else ""))

    @property
    def key(self) -> str:
        return f"{self.target}/{self.model_key}/{self.storage}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- the configurations each step takes ---------------------------------------------------------
    @property
    def group_rates(self) -> tuple[tuple[str, float], ...]:
        return tuple((layer, self.full_res_rate) for layer in self.full_res)

    def prune_config(self, seed: int) -> PruneConfig:
        return PruneConfig(rate=self.rate, method=PruneMethod.channel.value, finetune_steps=self.steps, seed=seed,
                           group_rates=self.group_rates)

    def sparse_config(self, seed: int) -> PruneConfig:
        return PruneConfig(rate=self.sparsity, method=PruneMethod.global_.value, finetune_steps=0, seed=seed)

    def export_config(self) -> ExportConfig:
        fmt = "neuralnetwork" if self.target == "ios13" else "mlprogram"
        return ExportConfig(format=fmt, weights=None if self.weights == "fp16" else self.weights,
                            target=coreml_target(self.target), bits_by_layer="auto" if self.bits_by_layer else None,
                            palette_method="gptq" if self.gptq else "kmeans")

    @property
    def shorter(self) -> "Recipe":
        """The float model a continued distillation starts from (``from_steps`` of the same pruning)."""
        return Recipe(target=self.target, rate=self.rate, steps=self.from_steps, full_res_rate=self.full_res_rate,
                      full_res=self.full_res)

    # -- the commands that rebuild the file -------------------------------------------------------------
    def commands(self, checkpoint: str, output: str, cfg: "OptimizeConfig", threads: int,
                 backend: str | None = None) -> list[str]:
        """The ``tbopt`` chain that writes this recipe's file at ``output`` from ``checkpoint``.

        ``threads`` are the search's: distillation and calibration give the same numbers only with
        the same thread count. ``backend`` pins the int8 engine the search chose (engines are
        ranked by timing, which varies from run to run; the rest of ``tbopt quantize`` is
        deterministic).
        """
        threads_opt = ["--threads", str(threads)]
        data = ["--calib", str(cfg.calib)] if cfg.calib else []  # the unlabeled images, as prune names them
        lines: list[list[str]] = []
        source = checkpoint
        stem = Path(checkpoint).stem
        if self.rate:
            pruned = f"{stem}_channel-{_pct(self.rate)}{'-fullres' if self.full_res_rate else ''}.pt"
            groups = [a for layer, r in self.group_rates for a in ("--group-rate", f"{layer}={r:g}")]
            line = ["tbopt", "prune", source, "--method", "channel", "--rate", f"{self.rate:g}", *groups,
                    "--seed", str(cfg.seed), *data, *threads_opt]
            if self.from_steps:
                shorter = pruned.replace(".pt", f"-{self.from_steps}.pt")
                lines.append(line + ["--finetune-steps", str(self.from_steps), "-o", shorter])
                line = line + ["--continue-from", shorter]
            lines.append(line + ["--finetune-steps", str(self.steps), "-o", pruned])
            source, stem = pruned, Path(pruned).stem
        if self.sparsity:
            sparse = f"{stem}_sparse-{_pct(self.sparsity)}.pt"
            lines.append(["tbopt", "prune", source, "--method", "global", "--rate", f"{self.sparsity:g}",
                          "--finetune-steps", "0", *threads_opt, "-o", sparse])
            source = sparse
        if self.is_cpu:
            q = cfg.quantize_config()
            line = ["tbopt", "quantize", source, "--backend", backend or q.backend, "--min-fidelity", f"{q.min_psnr_db:g}",
                    "--calib-count", str(q.calib_count)]
            if cfg.calib:
                line += ["--calib", str(cfg.calib)]
            lines.append(line + threads_opt + ["-o", output])
        else:
            line = ["tbopt", "export", source, "--weights", self.weights]  # fp16 too: export's default is int8
            if self.gptq:
                line += ["--palette-method", "gptq"]
            if self.bits_by_layer:
                line += ["--bits-by-layer", "auto"]
            if self.fit_steps:
                line += ["--fit-palettes", str(self.fit_steps)]
            if self.bits_by_layer or self.fit_steps or self.gptq:
                line += data  # one --calib folder: bits chosen, GPTQ calibrated and palettes fitted on them
            lines.append(line + ["--target", coreml_target(self.target), "-o", output])
        if lines:  # the first command opens the checkpoint; the artifacts it writes remember --arch
            lines[0][3:3] = model_args(cfg.arch, cfg.arch_kwargs, cfg.trust_pickle)
        return [shlex.join(line) for line in lines]


def _pct(v: float) -> str:
    return f"{v * 100:g}".replace(".", "p")


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything ``tbopt optimize`` can be told; ``to_dict`` goes into ``search.json``."""

    max_drop_db: float = 0.3  # PSNR against targets may drop this much (images with targets)
    min_fidelity_db: float = 40.0  # ... else the made-up images must stay this close to the original's
    targets: tuple[str, ...] = DEFAULT_TARGETS
    data: Path | None = None  # images scored (default: the built-in test set)
    limit: int | None = None
    calib: Path | None = None  # unlabeled images: channel ranking, distillation, int8 calibration
    #: Minutes after which no new step starts (nor a distillation expected to end after it); None: no limit.
    #: By default the whole search, writing included, stays within about 15 minutes on 2 cores.
    time_budget_min: float | None = DEFAULT_TIME_BUDGET_MIN
    #: The pruning part of the space: channel rates (0 is always tried first) and distillation lengths
    #: (None: tbopt prune's default for channel pruning). A longer distillation is tried only for the
    #: rates whose shorter one kept the quality: it leaves room for the smaller storage modes.
    rates: tuple[float, ...] = (0.3, 0.4, 0.5)
    #: Rates below the first, tried only when the first misses the budget after its short
    #: distillation (Core ML bytes still shrink where the CPU would want more channels).
    lower_rates: tuple[float, ...] = (0.25, 0.2)
    #: GPTQ palettes (``tbopt export --palette-method gptq``) for the palettes plain k-means missed.
    gptq: bool = True
    finetune_steps: tuple[int | None, ...] = (None, 2000)
    #: For the CPU: after the longest distillation of every rate that kept the quality, the same rate
    #: with the channel groups of the full-resolution convs pruned at these rates (0.66 keeps 8 of 24
    #: channels): their norms, padding and (de)quantization pass over every pixel, so they pay most.
    #: What 8 channels there, and elsewhere, measured: docs/tried-and-measured.md.
    full_res_rates: tuple[float, ...] = (0.66,)
    sparsities: tuple[float, ...] = (0.5, 0.75)
    palettes: tuple[str, ...] = PALETTES
    #: For the palettes that missed the budget: bits chosen by layer in the same bytes (tbopt export
    #: --bits-by-layer auto, where the format has it), fitted palettes (--fit-palettes N; 0: not tried).
    bits_by_layer: bool = True
    fit_steps: int = 300
    int8_min_psnr_db: float = 50.0  # int8 fidelity to its float model (see tbopt run --min-fidelity)
    calib_count: int = 32
    backend: str = "auto"
    threads: int | None = None
    runs: int = 30
    warmup: int = 5
    seed: int = 0
    #: A user's own network (``--arch package.module:Class``, ``--arch-kwargs``, ``--trust-pickle``).
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_drop_db) and self.max_drop_db >= 0):
            raise UsageError(f"--max-drop must be a number of dB >= 0, got {self.max_drop_db}")
        if not (math.isfinite(self.min_fidelity_db) and self.min_fidelity_db > 0):
            raise UsageError(f"--min-fidelity must be a positive number of dB, got {self.min_fidelity_db}")
        targets = tuple(dict.fromkeys(str(t).strip().lower() for t in self.targets))
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise UsageError(f"--for {', '.join(bad) or '(none)'}: choose from {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", targets)
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise UsageError(f"--time-budget must be > 0 minutes, got {self.time_budget_min}")
        rates = tuple(sorted({float(r) for r in self.rates if float(r) != 0.0}))
        for r in rates:
            PruneConfig(rate=r, method="channel")  # refuses a rate outside [0, 1)
        object.__setattr__(self, "rates", rates)
        lower = tuple(sorted({float(r) for r in self.lower_rates if 0.0 < float(r) < (rates[0] if rates else 1.0)},
                             reverse=True))
        for r in lower:
            PruneConfig(rate=r, method="channel")
        object.__setattr__(self, "lower_rates", lower)
        steps = tuple(dict.fromkeys(self.finetune_steps)) or (None,)
        if any(s is not None and s < 0 for s in steps):
            raise UsageError("--finetune-steps must be >= 0")
        object.__setattr__(self, "finetune_steps", steps)
        full_res_rates = tuple(sorted({float(r) for r in self.full_res_rates if float(r) != 0.0}))
        for r in full_res_rates:
            PruneConfig(rate=r, method="channel")  # refuses a rate outside [0, 1)
        object.__setattr__(self, "full_res_rates", full_res_rates)
        sparsities = tuple(sorted({float(s) for s in self.sparsities}))
        if any(not 0 < s < 1 for s in sparsities):
            raise UsageError(f"sparsities must be in (0, 1), got {self.sparsities}")
        object.__setattr__(self, "sparsities", sparsities)
        bad = [p for p in self.palettes if p not in PALETTES]
        if bad:
            raise UsageError(f"unknown palettes {bad}; choose from {', '.join(PALETTES)}")
        object.__setattr__(self, "palettes", tuple(p for p in PALETTES if p in self.palettes))
        if self.fit_steps < 0:
            raise UsageError(f"fit steps must be >= 0, got {self.fit_steps}")
        for p in ("data", "calib"):
            if getattr(self, p) is not None:
                object.__setattr__(self, p, Path(getattr(self, p)))
        self.quantize_config()  # refuses bad int8 options before any work

    @property
    def time_budget_s(self) -> float | None:
        return None if self.time_budget_min is None else self.time_budget_min * 60.0

    def resolved_steps(self) -> tuple[int, ...]:
        """Distillation lengths, with ``None`` resolved to tbopt prune's default, shortest first."""
        return tuple(sorted({PruneConfig(rate=0.3, method="channel", finetune_steps=s).steps
                             for s in self.finetune_steps}))

    def quantize_config(self) -> QuantizeConfig:
        return QuantizeConfig(backend=self.backend, calib=self.calib, calib_count=self.calib_count,
                              min_psnr_db=self.int8_min_psnr_db, threads=self.threads, runs=self.runs,
                              warmup=self.warmup)

    def storage_modes(self, target: str) -> list[str]:
        """Plain Core ML weight modes for ``target``, largest first (after fp16 and int8)."""
        return [p for p in self.palettes if target in ("ios13", "ios18") or p not in IOS18_PALETTES]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "calib"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["finetune_steps"] = list(self.resolved_steps())
        d["version"] = OPTIMIZE_VERSION
        return d

    def cache_context(self) -> dict[str, Any]:
        """What every cached evaluation depends on besides its recipe (a change starts afresh)."""
        return {"version": OPTIMIZE_VERSION, "data": str(self.data) if self.data else None, "limit": self.limit,
                "calib": str(self.calib) if self.calib else None, "calib_count": self.calib_count,
                "backend": self.backend, "int8_min_psnr_db": self.int8_min_psnr_db, "threads": self.threads,
                "seed": self.seed, "runs": self.runs, "warmup": self.warmup, "arch": self.arch,
                "arch_kwargs": self.arch_kwargs}

    def model_options(self) -> dict[str, Any]:
        """``load_model``'s keywords for the checkpoint."""
        return {"arch": self.arch, "arch_kwargs": self.arch_kwargs, "trust_pickle": self.trust_pickle}


@dataclass(frozen=True)
class Budget:
    """The quality a candidate must keep: PSNR against targets within ``max_drop_db`` of the
    original's when the images have targets, else fidelity to the original of ``min_fidelity_db``."""

    reference_psnr_db: float | None
    max_drop_db: float
    min_fidelity_db: float

    @property
    def uses_targets(self) -> bool:
        return self.reference_psnr_db is not None

    @property
    def line_db(self) -> float:
        """The quality a candidate must reach, on the axis the search ranks by."""
        if self.reference_psnr_db is not None:
            return self.reference_psnr_db - self.max_drop_db
        return self.min_fidelity_db

    def quality(self, target_psnr_db: float | None, fidelity_db: float | None) -> float | None:
        return target_psnr_db if self.uses_targets else fidelity_db

    def keeps(self, target_psnr_db: float | None, fidelity_db: float | None) -> bool:
        q = self.quality(target_psnr_db, fidelity_db)
        return q is not None and q >= self.line_db - 1e-9

    def describe(self) -> str:
        if self.reference_psnr_db is not None:
            return (f"PSNR against targets at least {self.line_db:.2f} dB (the original's "
                    f"{self.reference_psnr_db:.2f} dB minus --max-drop {self.max_drop_db:g})")
        return f"fidelity to the original at least {self.min_fidelity_db:g} dB (--min-fidelity; the images have no targets)"
