"""The tbopt artifact format: a float model's weights with its architecture, preprocessing and history.

A tbopt artifact is a ``torch.save`` of plain data (tensors, strings, numbers), so it loads with
``torch.load(weights_only=True)``: the architecture is named (TinyBeauty widths, or a user's
``module:Class`` with keyword arguments), never pickled. Writing is atomic.
"""

from __future__ import annotations

import importlib
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import __version__
from .errors import ArchitectureMismatchError, ConfigError, InputError
from .model import TinyBeauty, TinyBeautyConfig
from .written import WrittenFile, write_file

ARTIFACT_FORMAT = "tbopt-artifact"


ARTIFACT_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """How images reach the network: square ``size``, values mapped to ``value_range``."""

    size: int = 256
    value_range: tuple[float, float] = (-1.0, 1.0)
    output: str = "residual"  # the network returns r; the image is clamp(x + r)

    def __post_init__(self) -> None:
        if self.size < 8 or self.size % 4:
            raise ConfigError(f"model input size must be a multiple of 4 and >= 8, got {self.size}")
        if self.output not in ("residual", "image"):
            raise ConfigError(f"preprocessing output must be 'residual' or 'image', got {self.output!r}")
        object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "value_range": list(self.value_range), "output": self.output}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        return cls(size=int(d.get("size", 256)), value_range=tuple(d.get("value_range", (-1.0, 1.0))),
                   output=str(d.get("output", "residual")))


@dataclass
class HistoryStep:
    """One thing done to a model: which step, the command, its configuration and figures."""

    step: str
    command: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    time: str = ""
    tbopt_version: str = __version__

    @classmethod
    def now(cls, step: str, command: str = "", config: Mapping[str, Any] | None = None,
            figures: Mapping[str, Any] | None = None) -> "HistoryStep":
        return cls(step, command, dict(config or {}), dict(figures or {}),
                   datetime.now(timezone.utc).replace(microsecond=0).isoformat())

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "command": self.command, "config": self.config,
                "figures": self.figures, "time": self.time, "tbopt_version": self.tbopt_version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HistoryStep":
        return cls(str(d.get("step", "?")), str(d.get("command", "")), dict(d.get("config") or {}),
                   dict(d.get("figures") or {}), str(d.get("time", "")), str(d.get("tbopt_version", "")))


@dataclass(frozen=True)
class ArchSpec:
    """Which network a state dict belongs to: TinyBeauty with a config, or a user's class."""

    name: str = "tinybeauty"  # "tinybeauty" | "custom"
    config: dict[str, Any] = field(default_factory=dict)  # TinyBeautyConfig.to_dict()
    target: str = ""  # "package.module:ClassName" for custom
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def tinybeauty(cls, cfg: TinyBeautyConfig) -> "ArchSpec":
        return cls("tinybeauty", cfg.to_dict())

    @classmethod
    def custom(cls, target: str, kwargs: Mapping[str, Any] | None = None) -> "ArchSpec":
        if ":" not in target or not all(target.split(":", 1)):
            raise ConfigError(f"--arch must look like package.module:ClassName, got {target!r}")
        return cls("custom", {}, target, dict(kwargs or {}))

    def to_dict(self) -> dict[str, Any]:
        if self.name == "tinybeauty":
            return {"name": "tinybeauty", "config": dict(self.config)}
        return {"name": "custom", "target": self.target, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ArchSpec":
        if d.get("name") == "tinybeauty":
            return cls("tinybeauty", dict(d.get("config") or {}))
        if d.get("name") == "custom":
            return cls.custom(str(d.get("target", "")), d.get("kwargs") or {})
        raise ConfigError(f"unknown architecture {d.get('name')!r} in artifact")

    def describe(self) -> str:
        if self.name == "tinybeauty":
            cfg = TinyBeautyConfig.from_dict(self.config)
            if cfg.is_uniform:
                return f"TinyBeauty (width {cfg.first}, {cfg.n_res}+{cfg.n_res} residual blocks)"
            return f"TinyBeauty, channel-pruned ({cfg.n_res}+{cfg.n_res} residual blocks, per-group widths)"
        return f"custom {self.target}"

    def build(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Instantiate the network (weights uninitialised); shapes follow ``state_dict`` if given."""
        if self.name == "tinybeauty":
            return TinyBeauty(TinyBeautyConfig.from_dict(self.config))
        module_name, _, class_name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the user's arch
            raise ConfigError(f"cannot import {module_name!r} for --arch {self.target}: {exc}") from exc
        cls = getattr(module, class_name, None)
        if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"--arch {self.target}: {class_name!r} is not an nn.Module class in {module_name}")
        try:
            model = cls(**self.kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"--arch {self.target} with --arch-kwargs {json.dumps(self.kwargs)} failed: {exc}") from exc
        if state_dict is not None:
            resize_to_state_dict(model, state_dict)
        return model


@dataclass
class Artifact:
    """A float model as tbopt stores it (a ``.pt`` that loads with ``weights_only=True``)."""

    arch: ArchSpec
    state_dict: dict[str, torch.Tensor]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    history: list[HistoryStep] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_tinybeauty(cls, cfg: TinyBeautyConfig, state_dict: Mapping[str, torch.Tensor],
                       history: list[HistoryStep] | None = None, **kw: Any) -> "Artifact":
        return cls(ArchSpec.tinybeauty(cfg), _clean_state_dict(state_dict), history=list(history or []), **kw)

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_VERSION,
            "tbopt_version": __version__,
            "arch": self.arch.to_dict(),
            "state_dict": _clean_state_dict(self.state_dict),
            "preprocessing": self.preprocessing.to_dict(),
            "history": [h.to_dict() for h in self.history],
            "source": dict(self.source),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "Artifact":
        version = payload.get("format_version")
        if not isinstance(version, int) or version > ARTIFACT_VERSION:
            raise InputError(
                f"tbopt artifact format version {version!r} is not supported by tbopt {__version__} "
                f"(it reads versions up to {ARTIFACT_VERSION})",
                hint="upgrade tbopt",
            )
        try:
            return cls(
                arch=ArchSpec.from_dict(payload["arch"]),
                state_dict=dict(payload["state_dict"]),
                preprocessing=Preprocessing.from_dict(payload.get("preprocessing") or {}),
                history=[HistoryStep.from_dict(h) for h in payload.get("history") or []],
                source=dict(payload.get("source") or {}),
            )
        except (KeyError, TypeError, ConfigError) as exc:
            raise InputError(f"malformed tbopt artifact: {exc}") from exc

    def build_model(self) -> nn.Module:
        model = self.arch.build(self.state_dict)
        load_state_dict_checked(model, self.state_dict)
        return model.eval()

    def with_step(self, model: nn.Module, step: HistoryStep, arch: ArchSpec | None = None) -> "Artifact":
        """A new artifact holding ``model``'s weights and this history plus ``step``."""
        return Artifact(arch or self.arch, _clean_state_dict(model.state_dict()), self.preprocessing,
                        [*self.history, step], dict(self.source))


def _clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def state_dict_diff(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched 'key: file shape vs model shape') of ``sd`` against ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: {tuple(sd[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


def _listing(label: str, items: list[str], n: int = 3) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return f"{len(items)} {label}: {', '.join(items[:n])}{more}"


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str = "the state dict") -> None:
    missing, unexpected, mismatched = state_dict_diff(model, sd)
    if missing or unexpected or mismatched:
        parts = [p for p in (_listing("missing", missing), _listing("unexpected", unexpected),
                             _listing("mismatched", mismatched)) if p]
        raise ArchitectureMismatchError(
            f"{what} does not fit {type(model).__name__}: " + "; ".join(parts),
            missing=missing, unexpected=unexpected, mismatched=mismatched,
            hint="pass --arch package.module:ClassName (and --arch-kwargs) for a network of your own",
        )
    model.load_state_dict(sd, strict=True)


def resize_to_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Give a freshly built plain conv network the (channel-pruned) shapes found in ``sd``.

    Channel pruning of a user's own network changes layer widths that its constructor
    does not take as arguments. Parameters and buffers are replaced by tensors of the
    stored shapes and the layers' width attributes updated, so the pruned network
    rebuilds from its state dict alone, with no pickled modules.
    """
    own = model.state_dict()
    if all(k in own and tuple(own[k].shape) == tuple(v.shape) for k, v in sd.items()):
        return
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        changed = False
        for pname, p in list(module.named_parameters(recurse=False)):
            key = prefix + pname
            if key in sd and tuple(sd[key].shape) != tuple(p.shape):
                setattr(module, pname, nn.Parameter(torch.empty_like(sd[key], dtype=p.dtype)))
                changed = True
        for bname, b in list(module.named_buffers(recurse=False)):
            key = prefix + bname
            if b is not None and key in sd and tuple(sd[key].shape) != tuple(b.shape):
                module.register_buffer(bname, torch.empty_like(sd[key], dtype=b.dtype))
                changed = True
        if not changed:
            continue
        w = getattr(module, "weight", None)
        if isinstance(module, nn.ConvTranspose2d | nn.ConvTranspose1d | nn.ConvTranspose3d):
            module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            if module.groups == module.in_channels == module.out_channels > 1:  # depthwise: cut channel by channel
                module.groups = w.shape[0]
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = w.shape
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = (w if w is not None else module.running_mean).shape[0]
        elif isinstance(module, nn.GroupNorm):
            module.num_channels = w.shape[0]
        elif hasattr(module, "num_features"):
            first = next(iter(module.parameters(recurse=False)), None)
            if first is not None:
                module.num_features = first.shape[0]


def artifact_found(version: Any, artifact: Artifact) -> str:
    """What :func:`load_model` says it found in a tbopt artifact file."""
    return f"a tbopt artifact (format v{version}, {len(artifact.history)} history steps)"


def artifact_bytes(artifact: Artifact) -> bytes:
    """The content of ``artifact``'s file (``torch.save`` of its payload), made in memory."""
    buffer = io.BytesIO()
    torch.save(artifact.to_payload(), buffer)
    return buffer.getvalue()


def write_artifact(artifact: Artifact, path: Path | str, *, force: bool = False) -> WrittenFile:
    """Write ``artifact`` atomically (an existing file is replaced only with ``force``); the file as
    written, so that nothing needs to read it back."""
    return write_file(path, artifact_bytes(artifact), force=force)


def save_artifact(artifact: Artifact, path: Path | str, *, force: bool = False) -> Path:
    """Write ``artifact`` atomically; refuse to replace an existing file without ``force``."""
    return write_artifact(artifact, path, force=force).path
