"""Read every supported checkpoint safely, each file once (the artifact format is in :mod:`.artifact`).

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
import io
import json
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .artifact import (
    ARTIFACT_FORMAT,
    ArchSpec,
    Artifact,
    HistoryStep,
    Preprocessing,
    artifact_found,
    load_state_dict_checked,
)
from .contexts import quantized_engine
from .errors import (
    ArchitectureMismatchError,
    ConfigError,
    InputError,
    NotImageModelError,
    UnsafeCheckpointError,
    UnsupportedError,
    UnusableModelError,
)
from .files import require_file
from .model import config_from_state_dict, looks_like_tinybeauty
from .sanity import nonfinite_tensors, nonfinite_weights_problem, output_problem, probe_input

#: Name of the JSON metadata file embedded in TorchScript archives written by tbopt.
TORCHSCRIPT_META = "tbopt.json"
#: Keys under which training scripts commonly keep the model's state dict.
STATE_DICT_KEYS = ("cleaner", "state_dict", "model_state_dict", "model", "net", "ema", "model_ema", "params")
_PREFIXES = ("module.", "_orig_mod.")


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
    #: Why the model cannot be right (NaN/Inf weights or outputs), one line each; only
    #: ``load_model(..., check=False)`` (``tbopt info``) returns a model that has any.
    problems: list[str] = field(default_factory=list)

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
    check: bool = True,
) -> LoadedModel:
    """Open any supported model file, build the network and say what was found.

    The model is checked (:func:`check_model`): a network that does not take and return one
    3-channel image is refused; one whose weights or probe output hold NaN or Inf is refused
    unless ``check`` is False, which records the problem in ``problems`` (``tbopt info``).
    """
    if Path(path).suffix.lower() in (".mlpackage", ".mlmodel"):
        raise NotImageModelError(f"{path} is a Core ML model; this command takes a PyTorch model (a checkpoint, "
                                 f"a tbopt artifact or TorchScript)", hint="give the checkpoint it was exported from")
    path = require_file(Path(path), "checkpoint")
    data = path.read_bytes()  # the one read of the file: hash, format and weights all come from these bytes
    return model_from_bytes(path, data, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, check=check)


def model_from_bytes(path: Path | str, data: bytes, *, arch: str | None = None,
                     arch_kwargs: str | Mapping[str, Any] | None = None, trust_pickle: bool = False,
                     check: bool = True) -> LoadedModel:
    """:func:`load_model` of a file whose bytes were read (or written) already: ``data`` is its
    content and ``path`` only names it."""
    path = Path(path)
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
        loaded = LoadedModel(path, "torchscript", f"{what}{' with tbopt metadata' if meta else ''}",
                             digest, module=module, metadata=meta, quantized_engine=engine, content=data)
        return check_model(loaded, check)

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
    return check_model(LoadedModel(path, "float", found, digest, artifact=artifact, module=module, content=data),
                       check)


def _probe(loaded: LoadedModel) -> Any:
    """The module's output on :func:`~.sanity.probe_input` (its int8 engine borrowed)."""
    x = torch.from_numpy(probe_input(loaded.preprocessing.size))
    borrow = quantized_engine(loaded.quantized_engine) if loaded.quantized_engine else contextlib.nullcontext()
    with borrow, torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = loaded.module(x)
    return y.float().numpy() if isinstance(y, torch.Tensor) else y


def _last_line_of_reason(exc: Exception) -> str:
    """What went wrong, from a module's error: TorchScript puts the interpreter's traceback first and
    the reason (e.g. ``mat1 and mat2 shapes cannot be multiplied``) on the last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return (last if ":" in last.split(" ")[0] else f"{type(exc).__name__}: {last}")[:200]


def check_model(loaded: LoadedModel, strict: bool = True) -> LoadedModel:
    """Refuse a model that is not one image in, one image out (always) or whose weights or output on a
    test image hold NaN or Inf (``strict``; otherwise it is kept, the problem in ``loaded.problems``)."""
    label = loaded.path
    tensors: dict[str, Any] = dict(loaded.artifact.state_dict) if loaded.artifact is not None else {}
    if loaded.artifact is None and loaded.module is not None:
        try:
            tensors = dict(loaded.module.state_dict())
        except Exception:  # noqa: BLE001 - some scripted modules have no state dict; the probe still runs
            tensors = {}
    bad = nonfinite_tensors(tensors)
    problems = [nonfinite_weights_problem(label, bad)] if bad else []
    size = loaded.preprocessing.size
    try:
        y = _probe(loaded)
    except Exception as exc:  # noqa: BLE001 - whatever the network raises, it does not take this image
        what = "a TorchScript module" if loaded.kind == "torchscript" else f"a {loaded.artifact.arch.describe()}"
        raise NotImageModelError(
            f"{label} holds {what} that cannot run on a (1, 3, {size}, {size}) image "
            f"({_last_line_of_reason(exc)}); tbopt needs a network that takes "
            f"one 3-channel image and returns one") from None
    found = output_problem(label, y, size)
    if found is not None:
        kind, message = found
        if kind is NotImageModelError:
            raise NotImageModelError(message)
        if not problems:
            problems.append(message)
    if problems and strict:
        raise UnusableModelError(problems[0], hint="retrain or re-export the model; tbopt info shows what it holds")
    loaded.problems = problems
    return loaded


