"""What ``tbopt export`` can be told and what a file needs: formats, targets, weight modes, the
plan (target, sparse storage) for one export, and the error an export raises. No torch or
coremltools here: the CLI imports it."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import ConfigError, TbOptError, UsageError

CONFIG_VERSION = 1
TARGETS = ("iOS13", "iOS14", "iOS15", "iOS16", "iOS17", "iOS18")
WEIGHT_MODES = ("fp16", "int8", "int4", "pal8", "pal6", "pal4", "pal3", "pal2")
#: Palette granularities (``--granularity``): one table per tensor, or per group of output channels.
GRANULARITIES = ("per-tensor", "per-grouped-channel")
#: ``--bits-by-layer``: palette bits chosen per layer within the size of N bits everywhere.
BITS_BY_LAYER_MODES = ("auto",)
#: ``--palette-method``: how palette entries and values are chosen: k-means on the weights alone, or
#: GPTQ on the calibration images' layer inputs (:mod:`.palette_gptq`; same tables, same bytes).
PALETTE_METHODS = ("kmeans", "gptq")
#: Palette sizes coremltools writes (3 bits from iOS18 on).
PALETTE_BITS = (1, 2, 3, 4, 6, 8)
#: Activation storage (``--activations``): float as computed, or int8 (quantize/dequantize pairs).
ACTIVATION_MODES = ("int8",)
#: Defaults of ``--block-size`` (int4: input channels per scale) and ``--group-size`` (output
#: channels per palette); a layer whose channels they do not divide gets the largest common divisor.
DEFAULT_BLOCK_SIZE = 8
DEFAULT_GROUP_SIZE = 1
#: ``tbopt export``'s weight storage when neither ``--weights`` nor ``--fp16``/``--fp32`` is given (as
#: ``tbopt run``'s): linear int8 per output channel, half the bytes of fp16.
DEFAULT_WEIGHTS = "int8"
#: Calibration images for ``--activations int8`` when ``--calib-count`` is not given.
DEFAULT_CALIB_COUNT = 16
FORMAT_BY_SUFFIX = {".mlmodel": "neuralnetwork", ".mlpackage": "mlprogram"}
FORMAT_NAMES = {"neuralnetwork": "NeuralNetwork (.mlmodel)", "mlprogram": "ML Program (.mlpackage)"}
#: A checkpoint with at least this share of zero weights counts as pruned (``--sparse auto``).
SPARSE_MIN_ZEROS = 0.10
#: Names of the model's inputs and outputs.
IMAGE_IN, IMAGE_OUT = "image", "made_up"
TENSOR_IN, TENSOR_OUT = "input", "residual"
#: Metadata keys (userDefined) tbopt writes.
META_PREFIX = "tbopt."
#: Ops whose constant weight input is compressed (biases, norm scales and the like are not).
_WEIGHT_OPS = ("conv", "conv_transpose", "linear", "matmul")


class ExportError(TbOptError):
    """coremltools could not convert or compress the model, or the written file is not what was asked."""


def _target_index(target: str) -> int:
    return TARGETS.index(target)


def palette_bits_for(target: str | None) -> tuple[int, ...]:
    """Palette sizes a file for ``target`` may hold (None: any, 3 bits included)."""
    if target is None or _target_index(target) >= _target_index("iOS18"):
        return PALETTE_BITS
    return tuple(b for b in PALETTE_BITS if b != 3)


def normalize_target(target: str | None) -> str | None:
    if target is None:
        return None
    for t in TARGETS:
        if t.lower() == str(target).strip().lower():
            return t
    raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def format_for_path(path: Path | str) -> str:
    """``neuralnetwork`` for ``.mlmodel``, ``mlprogram`` for ``.mlpackage``."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_BY_SUFFIX:
        raise UsageError(
            f"cannot tell the Core ML format from {Path(path).name!r}: the output must end in "
            f".mlmodel (NeuralNetwork, iOS 13+) or .mlpackage (ML Program, iOS 15+)")
    return FORMAT_BY_SUFFIX[suffix]


@dataclass
class ExportConfig:
    """What to write. ``weights=None`` stores weights at the compute ``precision`` (``tbopt export``
    passes ``weights=DEFAULT_WEIGHTS`` unless told ``--fp16``, ``--fp32`` or ``--weights``)."""

    format: str = "neuralnetwork"  # "neuralnetwork" | "mlprogram"
    precision: str = "fp16"  # "fp16" | "fp32"
    weights: str | None = None  # None | one of WEIGHT_MODES
    sparse: str = "auto"  # "auto" | "off"
    target: str | None = None  # None: the lowest iOS the format and compression allow
    io: str = "image"  # "image" | "tensor"
    size: int | None = None  # None: the model's own input size
    author: str | None = None
    license: str | None = None
    model_version: str = "1.0"
    #: Steps of fine-tuning onto the palettes before export (``--fit-palettes``; palN only): a
    #: distillation from the model itself on unlabeled images (``fit_data``, a folder; default
    #: ``fit_images`` synthetic portraits), ``fit_batch_size`` images a step, Adam from ``fit_lr``.
    fit_palettes: int = 0
    fit_data: str | None = None
    seed: int = 0
    fit_images: int = 64
    fit_batch_size: int = 2
    fit_lr: float = 1e-3
    version: int = CONFIG_VERSION
    activations: str | None = None  # None: float activations; "int8": quantize/dequantize pairs (iOS17+)
    calib: str | None = None  # calibration images for int8 activations (None: synthetic portraits)
    calib_count: int = DEFAULT_CALIB_COUNT
    block_size: int | None = None  # int4: input channels per scale (None: DEFAULT_BLOCK_SIZE)
    granularity: str = "per-tensor"  # palettes: one table per tensor or per group of output channels
    group_size: int | None = None  # per-grouped-channel: output channels per table (None: DEFAULT_GROUP_SIZE)
    per_channel_scale: bool = False  # palettes: each output channel scaled to [-1, 1] first (iOS18)
    #: None: palN everywhere; "auto": N-2 to 8 bits per layer from measured sensitivities (calibration
    #: images as for int8 activations), the weights no larger than palN everywhere
    bits_by_layer: str | None = None
    #: "kmeans": each weight rounded to its nearest k-means entry; "gptq": entries and table values
    #: chosen for each layer's output on the calibration images (``calib``, ``calib_count``)
    palette_method: str = "kmeans"
    #: CPU threads of what export computes (GPTQ, palette fitting, sensitivities): the same seed and
    #: threads give the same weights. None: all cores, and left out of the recorded configuration.
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMAT_NAMES:
            raise ConfigError(f"format must be 'neuralnetwork' or 'mlprogram', got {self.format!r}")
        if self.precision not in ("fp16", "fp32"):
            raise ConfigError(f"precision must be fp16 or fp32, got {self.precision!r}")
        if self.weights is not None and self.weights not in WEIGHT_MODES:
            raise ConfigError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}")
        if self.weights == "fp16" and self.precision == "fp32":
            raise UsageError("--weights fp16 contradicts --fp32: fp32 weights are what --fp32 stores",
                             hint="drop --weights for fp32 weights, or use --fp16")
        if self.sparse not in ("auto", "off"):
            raise ConfigError(f"--sparse must be auto or off, got {self.sparse!r}")
        self.target = normalize_target(self.target)
        if self.io not in ("image", "tensor"):
            raise ConfigError(f"--io must be image or tensor, got {self.io!r}")
        if self.size is not None and (self.size < 8 or self.size % 4):
            raise ConfigError(f"--size must be a multiple of 4 and >= 8, got {self.size}")
        self._check_compression()
        if self.fit_palettes < 0:
            raise UsageError(f"--fit-palettes must be >= 0, got {self.fit_palettes}")
        if self.fit_palettes and self.palette_bits is None:
            raise UsageError(f"--fit-palettes fits weights onto palettes, but the weights are stored as "
                             f"{self.weight_mode}", hint="add --weights pal8|pal6|pal4|pal3|pal2")
        if self.fit_data is not None and not self.fit_palettes:
            raise UsageError("fit_data gives the images --fit-palettes trains on; without it nothing uses them")
        if self.fit_images < 1 or self.fit_batch_size < 1 or not self.fit_lr > 0:
            raise ConfigError("fit_images and fit_batch_size must be >= 1 and fit_lr > 0")
        if self.fit_data is not None:
            self.fit_data = str(self.fit_data)
        if self.format == "neuralnetwork" and self.target is not None and _target_index(self.target) > 1:
            raise UsageError(
                f"--target {self.target} with a .mlmodel: the NeuralNetwork format is written for iOS13 or "
                f"iOS14 (it also runs on later iOS)",
                hint="write an .mlpackage (ML Program) for an iOS15+ target")

    def _check_compression(self) -> None:
        """int4, grouped palettes, per-channel scales and int8 activations: only where they apply."""
        program = self.format == "mlprogram"
        if self.activations is not None:
            if self.activations not in ACTIVATION_MODES:
                raise ConfigError(f"--activations must be int8, got {self.activations!r}")
            if not program:
                raise UsageError("--activations int8 needs an ML Program: int8 activations (quantize/dequantize "
                                 "pairs) exist from iOS 17 on", hint="write an .mlpackage")
        elif self.calib is not None and self.bits_by_layer is None and self.palette_method == "kmeans":
            raise UsageError("--calib calibrates int8 activations, --bits-by-layer and --palette-method gptq",
                             hint="add --activations int8, or drop --calib (with --fit-palettes it is also the "
                                  "fit's images)")
        if self.calib_count < 1:
            raise ConfigError(f"--calib-count must be >= 1, got {self.calib_count}")
        if self.weights == "int4" and not program:
            raise UsageError("--weights int4 (per-block) needs an ML Program for iOS 18", hint="write an .mlpackage")
        if self.block_size is not None:
            if self.weights != "int4":
                raise UsageError("--block-size applies to --weights int4", hint="add --weights int4")
            if self.block_size < 1:
                raise ConfigError(f"--block-size must be >= 1, got {self.block_size}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        palettes = self.weights is not None and self.weights.startswith("pal")
        if self.granularity != "per-tensor" or self.per_channel_scale:
            what = "--granularity per-grouped-channel" if self.granularity != "per-tensor" else "--per-channel-scale"
            if not palettes:
                raise UsageError(f"{what} applies to palettes", hint="add --weights pal4 (or another palN)")
            if not program:
                raise UsageError(f"{what} needs an ML Program for iOS 18", hint="write an .mlpackage")
        if self.bits_by_layer is not None:
            if self.bits_by_layer not in BITS_BY_LAYER_MODES:
                raise ConfigError(f"--bits-by-layer must be auto, got {self.bits_by_layer!r}")
            if not palettes:
                raise UsageError("--bits-by-layer chooses palette sizes", hint="add --weights pal4 (or another palN)")
        if self.palette_method not in PALETTE_METHODS:
            raise ConfigError(f"--palette-method must be one of {', '.join(PALETTE_METHODS)}, "
                              f"got {self.palette_method!r}")
        if self.palette_method == "gptq":
            if not palettes:
                raise UsageError("--palette-method gptq chooses palette entries",
                                 hint="add --weights pal4 (or another palN)")
            if self.per_channel_scale:  # coremltools would rescale each channel and cluster the GPTQ tables again
                raise UsageError("--palette-method gptq fits unscaled tables; it cannot be combined with "
                                 "--per-channel-scale", hint="drop --per-channel-scale")
        if self.group_size is not None:
            if self.granularity != "per-grouped-channel":
                raise UsageError("--group-size applies to --granularity per-grouped-channel",
                                 hint="add --granularity per-grouped-channel")
            if self.group_size < 1:
                raise ConfigError(f"--group-size must be >= 1, got {self.group_size}")

    @property
    def int4_block_size(self) -> int:
        return self.block_size or DEFAULT_BLOCK_SIZE

    @property
    def palette_group_size(self) -> int:
        return self.group_size or DEFAULT_GROUP_SIZE

    @property
    def grouped(self) -> bool:
        """Palettes per group of output channels (iOS18)."""
        return self.granularity == "per-grouped-channel"

    @property
    def weight_mode(self) -> str:
        """How conv/linear weights are stored: fp16, fp32, int8 or palN."""
        return self.weights or self.precision

    @property
    def palette_bits(self) -> int | None:
        return int(self.weight_mode[3:]) if self.weight_mode.startswith("pal") else None

    @classmethod
    def for_output(cls, output: Path | str, **kwargs: Any) -> "ExportConfig":
        return cls(format=format_for_path(output), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["threads"] is None:
            del d["threads"]  # files written before the option keep byte-identical histories
        return d

    def command_line(self, source: str | None = None, output: str | None = None) -> str:
        """The ``tbopt export`` command that writes this configuration again."""
        default = ExportConfig(format=self.format)
        parts = ["tbopt export"] + ([shlex.quote(str(source))] if source else [])
        if output:
            parts.append(f"-o {shlex.quote(str(output))}")
        if self.weights is None or self.precision != default.precision:
            # without --weights tbopt export stores int8: fp16 weights (precision, no weights) need --fp16
            parts.append(f"--{self.precision}")
        for attr, flag in (("weights", "--weights"), ("sparse", "--sparse"), ("target", "--target"), ("io", "--io"),
                           ("size", "--size"), ("block_size", "--block-size"), ("granularity", "--granularity"),
                           ("group_size", "--group-size"), ("bits_by_layer", "--bits-by-layer"),
                           ("palette_method", "--palette-method"),
                           ("activations", "--activations"),
                           ("calib_count", "--calib-count"), ("fit_palettes", "--fit-palettes"),
                           ("seed", "--seed"), ("author", "--author"), ("license", "--license"),
                           ("model_version", "--model-version"), ("threads", "--threads")):
            value = getattr(self, attr)
            if value != getattr(default, attr):
                parts.append(f"{flag} {shlex.quote(str(value))}")
        if self.per_channel_scale:
            parts.append("--per-channel-scale")
        images = self.calib or self.fit_data  # one --calib folder serves calibration and palette fitting
        if images:
            parts.append(f"--calib {shlex.quote(str(images))}")
        return " ".join(parts)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExportConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# --- what the format and the compression need --------------------------------------------------------


def requirements(fmt: str, weight_mode: str, sparse: bool, *, activations: str | None = None, grouped: bool = False,
                 per_channel_scale: bool = False) -> list[tuple[str, str]]:
    """(minimum target, why) for each feature an export uses."""
    if fmt == "neuralnetwork":
        return [("iOS13", "the NeuralNetwork format as tbopt writes it")]
    needs = [("iOS15", "an ML Program")]
    bits = int(weight_mode[3:]) if weight_mode.startswith("pal") else None
    if activations == "int8":
        needs.append(("iOS17", "int8 activations (quantize/dequantize pairs)"))
    if weight_mode == "int8":
        needs.append(("iOS16", "int8 per-channel weights in an ML Program"))
    if weight_mode == "int4":
        needs.append(("iOS18", "int4 per-block weights"))
    if grouped:
        needs.append(("iOS18", "palettes per group of output channels"))
    if per_channel_scale:
        needs.append(("iOS18", "palettes with per-channel scales"))
    if bits is not None:
        if bits == 3:
            needs.append(("iOS18", "3-bit palettes in an ML Program"))
        else:
            needs.append(("iOS16", "palettized weights in an ML Program"))
    if sparse:
        needs.append(("iOS16", "sparse weights"))
        if weight_mode in ("int8", "int4") or bits is not None:
            needs.append(("iOS18", f"sparse weights stored jointly with {weight_mode} compression"))
    return needs


@dataclass
class ExportPlan:
    target: str
    sparse: bool  # some weights are stored sparse
    zero_fraction: float  # share of zeros among conv/linear weights
    sparse_threshold: float  # a tensor is stored sparse from this share of zeros on
    notes: list[str] = field(default_factory=list)


def tensor_dtype(config: ExportConfig, target: str) -> str:
    """Multiarray I/O type: fp16 where an ML Program computes in fp16 and iOS16+ allows fp16 I/O (no casts)."""
    fp16_io = config.format == "mlprogram" and config.precision == "fp16" and _target_index(target) >= 3
    return "float16" if fp16_io else "float32"


def storage_bits(weight_mode: str) -> int:
    return {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}.get(weight_mode) or int(weight_mode[3:])


def sparse_threshold(weight_mode: str) -> float:
    """Share of zeros from which sparse storage pays: the mask costs 1 bit per weight."""
    return max(SPARSE_MIN_ZEROS, 1.0 / storage_bits(weight_mode) + 0.02)


def plan_export(config: ExportConfig, tensor_zeros: list[tuple[int, int]]) -> ExportPlan:
    """The target to write and whether to store weights sparse; a clear error if the target is too low.

    ``tensor_zeros`` is (zeros, size) of every conv/linear weight tensor.
    """
    notes: list[str] = []
    total = sum(n for _, n in tensor_zeros)
    zeros = sum(z for z, _ in tensor_zeros) / total if total else 0.0
    threshold = sparse_threshold(config.weight_mode)
    sparse = False
    if config.sparse == "auto" and zeros >= SPARSE_MIN_ZEROS:
        pays = any(n and z / n >= threshold for z, n in tensor_zeros)
        if config.format == "neuralnetwork":
            notes.append(f"{zeros:.0%} of the weights are zero, but the NeuralNetwork format cannot store them "
                         f"sparse (an .mlpackage for iOS16+ can); stored dense")
        elif not pays:
            notes.append(f"{zeros:.0%} of the weights are zero, but no tensor has the {threshold:.0%} zeros from "
                         f"which sparse storage beats {config.weight_mode}; stored dense")
        else:
            sparse = True
    if sparse and config.per_channel_scale:  # coremltools 9 cannot scale the non-zero values of a sparse tensor
        raise UsageError("--per-channel-scale cannot be stored jointly with sparse weights",
                         hint="pass --sparse off to store the pruned weights dense")
    needs = requirements(config.format, config.weight_mode, sparse, activations=config.activations,
                         grouped=config.grouped, per_channel_scale=config.per_channel_scale)
    if config.bits_by_layer and config.target is None and config.format == "mlprogram":
        # a lower --target leaves 3 bits out of the choice (NeuralNetwork palettes take 1-8 bits on iOS 13)
        needs.append(("iOS18", "3-bit palettes among the bits chosen per layer"))
    target, why = max(needs, key=lambda n: _target_index(n[0]))
    if config.target is not None:
        if _target_index(config.target) < _target_index(target):
            hint = ("pass --sparse off to store the pruned weights dense" if sparse else
                    "--fp16 stores fp16 weights (twice the bytes), which an iOS15 ML Program reads"
                    if config.weights == "int8" and config.target == "iOS15" else None)
            raise UsageError(f"--target {config.target} is too low: {why} requires {target} or later", hint=hint)
        target = config.target
    return ExportPlan(target, sparse, zeros, threshold, notes)
