"""Read every supported checkpoint safely; write tbopt artifacts atomically.

What a stage-4 training run leaves behind comes in many shapes: the authors'
``{"cleaner": state_dict, "optimizer", "scheduler", "epoch"}``, a bare state dict,
a dict keeping it under ``state_dict``/``model_state_dict``/``model``/``net``/``ema``,
keys with a ``module.`` prefix. :func:`load_model` accepts all of them, tbopt's
own artifacts and TorchScript archives, and says what it found.

A checkpoint from a stranger must never run code: files are read with
``torch.load(weights_only=True)``. A file that needs arbitrary unpickling is refused
with an explanation, unless the caller passes ``trust_pickle=True``
(``--trust-pickle`` on the command line).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import __version__
from .contexts import quantized_engine
from .errors import ArchitectureMismatchError, ConfigError, InputError, UnsafeCheckpointError, UnsupportedError
from .files import atomic_output, require_file
from .model import TinyBeauty, TinyBeautyConfig, config_from_state_dict, looks_like_tinybeauty

ARTIFACT_FORMAT = "tbopt-artifact"
ARTIFACT_VERSION = 1
#: Name of the JSON metadata file embedded in TorchScript archives written by tbopt.
TORCHSCRIPT_META = "tbopt.json"
#: Keys under which training scripts commonly keep the model's state dict.
STATE_DICT_KEYS = ("cleaner", "state_dict", "model_state_dict", "model", "net", "ema", "model_ema", "params")
_PREFIXES = ("module.", "_orig_mod.")


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


@dataclass
class LoadedModel:
    """What :func:`load_model` found in a file."""

    path: Path
    kind: str  # "float" | "torchscript"
    found: str  # a sentence: what the file was and where the weights were
    sha256: str
    artifact: Artifact | None = None  # float models
    module: nn.Module | None = None  # the runnable model (built nn.Module, or ScriptModule)
    metadata: dict[str, Any] = field(default_factory=dict)  # TorchScript: embedded tbopt metadata
    #: int8 TorchScript: the quantized engine its weights were packed for at load time (run it with
    #: that engine borrowed); None for float models.
    quantized_engine: str | None = None
    #: The file's bytes as read (once) by :func:`load_model`; empty for a model built in memory.
    content: bytes = field(default=b"", repr=False)

    @property
    def preprocessing(self) -> Preprocessing:
        if self.artifact is not None:
            return self.artifact.preprocessing
        return Preprocessing.from_dict(self.metadata.get("preprocessing") or {})

    @property
    def history(self) -> list[HistoryStep]:
        if self.artifact is not None:
            return self.artifact.history
        return [HistoryStep.from_dict(h) for h in self.metadata.get("history") or []]


def _clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _strip_prefixes(sd: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}, prefix
    return dict(sd), None


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def is_torchscript_archive(data: bytes) -> bool:
    """True for a TorchScript archive (code and constants records), from the file's content."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names) and any(
        n.endswith("constants.pkl") for n in names)


def _torch_load(path: Path, data: bytes, trust_pickle: bool) -> Any:
    """``torch.load`` of a file's content (``path`` names it in messages), tensors only unless trusted."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes etc.: the outcome is reported below
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = pickled_globals(data)
        if names is None:
            raise InputError(f"{path} is not a readable PyTorch checkpoint: its data is not a valid "
                             f"pickle stream (random bytes, or a corrupt file)") from None
        if trust_pickle:
            return _trusted_load(path, data)
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        raise UnsafeCheckpointError(
            f"{path} holds pickled Python objects ({shown or 'custom classes'}), not just tensors; "
            f"unpickling them can run arbitrary code, so tbopt refuses to",
            hint="where you trust it, re-save it as a state dict: torch.save(model.state_dict(), 'model.pt'); "
                 "or pass --trust-pickle if you made this file yourself",
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError, IndexError,
            TypeError, zipfile.BadZipFile, UnicodeDecodeError, MemoryError) as exc:
        reason = _first_line_of_reason(str(exc))
        raise InputError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {reason}); "
            f"it may be truncated or corrupt"
        ) from None


def pickled_globals(source: Path | bytes) -> list[str] | None:
    """Names of the Python globals a checkpoint's pickle would import, without unpickling it.

    ``None`` if the data is not a valid pickle stream at all (random bytes, truncation).
    The pickle is only disassembled with :mod:`pickletools`, which runs nothing.
    """
    try:
        content = source if isinstance(source, bytes) else Path(source).read_bytes()
        if zipfile.is_zipfile(io.BytesIO(content)):
            with zipfile.ZipFile(io.BytesIO(content)) as zf:
                pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not pkl:
                    return None
                data = zf.read(pkl[0])
        else:
            data = content
        names: list[str] = []
        strings: list[str] = []
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError, UnicodeDecodeError, IndexError):
        return None
    safe_prefixes = ("torch._utils.", "collections.OrderedDict", "torch.FloatStorage", "torch.")
    unsafe = [n for n in dict.fromkeys(names) if not n.startswith(safe_prefixes)]
    return unsafe if unsafe else [n for n in dict.fromkeys(names)]


def _trusted_load(path: Path, data: bytes) -> Any:
    # Only reached with an explicit --trust-pickle: the user vouches for this file.
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # noqa: S614
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path} could not be unpickled even with --trust-pickle: {exc}") from None


def _first_line_of_reason(text: str) -> str:
    """The gist of a torch error: its first sentence, without the advice paragraphs."""
    for line in text.splitlines():
        line = line.strip()
        if "Unsupported global" in line:
            return line[line.index("Unsupported global"):].split(" was not an allowed")[0]
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(". ")[0].rstrip(".")
    return first[:160]


def _find_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded object, and a phrase saying where it was."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), f"a pickled {type(obj).__name__} module (loaded with --trust-pickle)"
    if _is_state_dict(obj):
        return dict(obj), "a bare state dict"
    if isinstance(obj, Mapping):
        if "cleaner" in obj and _is_state_dict(obj["cleaner"]):
            return dict(obj["cleaner"]), "the released TinyBeauty format (state dict under 'cleaner')"
        for key in STATE_DICT_KEYS:
            value = obj.get(key)
            if isinstance(value, nn.Module):
                return dict(value.state_dict()), f"a pickled module under {key!r} (loaded with --trust-pickle)"
            if _is_state_dict(value):
                return dict(value), f"a state dict under {key!r}"
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise InputError(
            f"no state dict found: the file holds a dict with keys {keys}"
            f"{' ...' if len(obj) > 8 else ''}",
            hint=f"tbopt looks for a bare state dict or one under {', '.join(STATE_DICT_KEYS)}",
        )
    raise InputError(f"no state dict found: the file holds a {type(obj).__name__}")


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


def _parse_arch(arch: str | None, arch_kwargs: str | Mapping[str, Any] | None) -> ArchSpec | None:
    if arch is None:
        if arch_kwargs:
            raise ConfigError("--arch-kwargs needs --arch")
        return None
    if isinstance(arch_kwargs, str):
        try:
            kwargs = json.loads(arch_kwargs) if arch_kwargs.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--arch-kwargs is not valid JSON: {exc}") from None
    else:
        kwargs = dict(arch_kwargs or {})
    if not isinstance(kwargs, dict):
        raise ConfigError("--arch-kwargs must be a JSON object, e.g. '{\"width\": 16}'")
    return ArchSpec.custom(arch, kwargs)


def _quantized_engine_of(path: Path, data: bytes) -> str | None:
    """The quantized engine an int8 archive was made for (from its metadata), or None.

    ``torch.jit.load`` re-packs int8 weights for whatever ``torch.backends.quantized.engine``
    is current, and the kernels that run later follow that packing: the archive must be
    loaded with this engine set.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            name = next((n for n in zf.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_META}")), None)
            meta = json.loads(zf.read(name)) if name else {}
    except (zipfile.BadZipFile, OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # torch.jit.load says what is wrong with the file
    engine = meta.get("quantized_engine") if isinstance(meta, dict) else None
    if not engine:
        return None
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise UnsupportedError(f"{path} holds int8 weights packed for the {engine} engine, which this PyTorch "
                               f"build does not have (it has {', '.join(supported)})",
                               hint="re-run tbopt quantize on this machine")
    return str(engine)


def _load_torchscript(data: bytes, extra: dict[str, str], engine: str | None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` with ``torch.backends.quantized.engine`` borrowed for ``engine`` (if any);
    the runner that runs the module borrows it again (``runtime.runners.TorchRunner``)."""
    with quantized_engine(engine) if engine else contextlib.nullcontext():
        if engine:
            # PyTorch warns once per process that quantized tensors are deprecated. Loading and
            # running TorchScript prints it from C++ straight to stderr; raised here from Python it
            # becomes a Python warning, which is ignored, and the once is used up.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "quantized tensors are deprecated" on int8 archives
            return torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)


def load_model(
    path: Path | str,
    *,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Open any supported model file, build the network and say what was found."""
    path = require_file(Path(path), "checkpoint")
    data = path.read_bytes()  # the one read of the file: hash, format and weights all come from these bytes
    digest = hashlib.sha256(data).hexdigest()
    spec = _parse_arch(arch, arch_kwargs)

    if is_torchscript_archive(data):
        extra = {TORCHSCRIPT_META: ""}
        engine = _quantized_engine_of(path, data)
        try:
            module = _load_torchscript(data, extra, engine)
        except Exception as exc:  # noqa: BLE001 - any failure means an unusable archive
            raise InputError(f"{path} is a TorchScript archive that cannot be loaded: "
                             f"{_first_line_of_reason(str(exc))}") from None
        meta: dict[str, Any] = {}
        if extra[TORCHSCRIPT_META]:
            try:
                meta = json.loads(extra[TORCHSCRIPT_META])
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError(f"{path}: its embedded {TORCHSCRIPT_META} metadata is not valid JSON") from None
        what = meta.get("kind_description") or "a TorchScript archive"
        module.eval()
        return LoadedModel(path, "torchscript", f"{what}{' with tbopt metadata' if meta else ''}",
                           digest, module=module, metadata=meta, quantized_engine=engine, content=data)

    obj = _torch_load(path, data, trust_pickle)
    if isinstance(obj, Mapping) and obj.get("format") == ARTIFACT_FORMAT:
        artifact = Artifact.from_payload(obj)
        if spec is not None:
            artifact.arch = spec
        found = artifact_found(obj.get("format_version"), artifact)
    else:
        sd, where = _find_state_dict(obj)
        sd, prefix = _strip_prefixes(sd)
        if prefix:
            where += f", '{prefix}' prefix removed"
        if spec is None:
            if not looks_like_tinybeauty(sd):
                keys = ", ".join(list(sd)[:3])
                raise ArchitectureMismatchError(
                    f"{path}: {where} that is not TinyBeauty ({len(sd)} tensors, e.g. {keys})",
                    unexpected=list(sd),
                    hint="pass --arch package.module:ClassName (and --arch-kwargs '{json}') to use your own network",
                )
            spec = ArchSpec.tinybeauty(config_from_state_dict(sd))
        artifact = Artifact(spec, {k: v for k, v in sd.items()},
                            source={"path": str(path), "sha256": digest, "found": where})
        found = where
    module = artifact.arch.build(artifact.state_dict)
    load_state_dict_checked(module, artifact.state_dict, what=f"{path}")
    module.eval()
    if not artifact.source:
        artifact.source = {"path": str(path), "sha256": digest, "found": found}
    return LoadedModel(path, "float", found, digest, artifact=artifact, module=module, content=data)


def artifact_found(version: Any, artifact: Artifact) -> str:
    """What :func:`load_model` says it found in a tbopt artifact file."""
    return f"a tbopt artifact (format v{version}, {len(artifact.history)} history steps)"


def save_artifact(artifact: Artifact, path: Path | str, *, force: bool = False) -> Path:
    """Write ``artifact`` atomically; refuse to replace an existing file without ``force``."""
    path = Path(path)
    with atomic_output(path, force=force) as tmp:
        torch.save(artifact.to_payload(), tmp)
    return path
