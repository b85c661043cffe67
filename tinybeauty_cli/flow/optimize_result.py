"""What ``tbopt optimize`` found: each candidate file and float model with its figures, and the
whole result (``search.json`` and the ``--json`` output)."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..core.load import cores, load_average, load_text, overload_note
from .optimize_config import Budget, OptimizeConfig, Recipe


def rounded(v: float | None) -> float | None:
    return None if v is None else round(float(v), 3)


@dataclass
class Candidate:
    """One file the search made and measured."""

    recipe: Recipe
    file: str  # inside the cache
    size_bytes: int
    zipped_bytes: int
    target_psnr_db: float | None
    fidelity_psnr_db: float | None
    worst_fidelity_db: float | None
    quality_db: float | None  # the figure the budget is on (PSNR, or fidelity without targets)
    kept: bool  # within the budget
    seconds: float
    latency_ms: float | None = None  # int8 files: median, batch 1
    engine: str | None = None
    threads: int | None = None
    backend: str | None = None  # the int8 engine tbopt quantize chose
    cached: bool = False
    pareto: bool = False
    notes: list[str] = field(default_factory=list)
    scored_with: str = "the file, as tbopt bench runs it"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"] = {**self.recipe.to_dict(), "model_key": self.recipe.model_key, "storage": self.recipe.storage}
        return d

    @classmethod
    def from_record(cls, record: dict[str, Any], budget: Budget) -> "Candidate":
        """A cached evaluation, judged by ``budget`` (the budget is not part of the evaluation); a
        record lacking a field, or holding one of another type, raises ``ValueError``."""
        d = checked_fields(cls, record, skip=("recipe", "quality_db", "kept", "cached", "pareto"))
        if not isinstance(record.get("recipe"), dict):
            raise ValueError("'recipe' is missing or not an object")
        d["recipe"] = Recipe.from_dict(record["recipe"])
        if d["recipe"].key != record.get("key"):
            raise ValueError(f"its recipe is {d['recipe'].key}, not {record.get('key')}")
        psnr, fid = d["target_psnr_db"], d["fidelity_psnr_db"]
        return cls(**{**d, "quality_db": budget.quality(psnr, fid), "kept": budget.keeps(psnr, fid),
                      "cached": True, "pareto": False})


@dataclass
class ModelEntry:
    """A float model the search made (channel-pruned, or with weights zeroed) and its scores."""

    key: str
    file: str
    target_psnr_db: float | None
    fidelity_psnr_db: float | None
    quality_db: float | None
    kept: bool
    seconds: float
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ModelEntry":
        """A cached float model's entry; ``ValueError`` when a field is missing or of another type."""
        if not isinstance(record.get("entry"), dict):
            raise ValueError("'entry' is missing or not an object")
        d = checked_fields(cls, record["entry"], skip=("quality_db", "kept", "cached"))
        if d["file"] != record.get("file") or d["key"] != record.get("key"):
            raise ValueError("its entry names another file or model than its record")
        return cls(**{**d, "quality_db": None, "kept": False})


#: The JSON types a record's field may take, by the field's declared type.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list[str]": (list,),
}


def checked_fields(cls: Any, record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` read from ``record``, each of its declared type (``ValueError``
    naming the first that is missing or is not); fields in ``skip`` are left out. ``A | None`` may be null;
    fields with a default may be absent."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name not in record:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ValueError(f"field {f.name!r} is missing")
        value, declared = record[f.name], str(f.type)
        optional = declared.endswith(" | None")
        kinds = _JSON_TYPES[declared.removesuffix(" | None")]
        if value is None and optional:
            out[f.name] = value
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"field {f.name!r} is {value!r}, not a {declared}")
        if declared == "list[str]" and not all(isinstance(v, str) for v in value):
            raise ValueError(f"field {f.name!r} is not a list of strings")
        out[f.name] = value
    return out


@dataclass
class OptimizeResult:
    """What ``tbopt optimize`` found; :meth:`to_dict` is ``search.json`` and the ``--json`` output."""

    checkpoint: str
    out: str
    command: str
    config: OptimizeConfig
    budget: Budget
    data: str
    original: dict[str, Any]
    candidates: list[Candidate]
    models: list[ModelEntry]
    skipped: list[dict[str, str]]
    not_tried: list[dict[str, str]]
    chosen: dict[str, dict[str, Any]]
    seconds: float
    threads: int
    notes: list[str] = field(default_factory=list)
    stopped: str = ""  # why the search ended
    costs: dict[str, Any] = field(default_factory=dict)  # the cost model measured on this run
    images_use: dict[str, Any] = field(default_factory=dict)  # which images were scored, which calibrated
    architecture: dict[str, Any] = field(default_factory=dict)  # what a replay of its recipes must match
    replay: dict[str, Any] = field(default_factory=dict)  # per target: replayed, or searched and why
    #: the load average when the search ended (its int8 files are timed at the end)
    load_average: float | None = field(default_factory=load_average)

    def __post_init__(self) -> None:
        if note := overload_note(self.load_average):
            self.notes.append(note)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tbopt_version": __version__, "command": self.command, "checkpoint": self.checkpoint, "out": self.out,
            "config": self.config.to_dict(), "data": self.data, "threads": self.threads,
            "load_average": self.load_average, "cpus": cores(),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
            "quality_axis": "PSNR vs targets" if self.budget.uses_targets else "fidelity to the original",
            "budget": {"description": self.budget.describe(), "line_db": round(self.budget.line_db, 3),
                       "reference_psnr_db": self.budget.reference_psnr_db, "max_drop_db": self.budget.max_drop_db,
                       "min_fidelity_db": self.budget.min_fidelity_db},
            "original": self.original, "chosen": self.chosen,
            "candidates": [c.to_dict() for c in self.candidates], "models": [m.to_dict() for m in self.models],
            "skipped": self.skipped, "not_tried": self.not_tried, "seconds": round(self.seconds, 1),
            "stopped": self.stopped, "cost_model": self.costs, "images_use": self.images_use,
            "architecture": self.architecture, "replay": self.replay, "notes": self.notes, "caption": caption(self),
        }


def caption(r: OptimizeResult) -> str:
    return (f"Scored on {r.data}. Quality: {r.budget.describe()}. Sizes on disk and zipped (DEFLATE 9). Latency: "
            f"int8 TorchScript files only, batch 1, {r.threads} thread(s), median of {r.config.runs} runs after "
            f"{r.config.warmup} warm-up, timed side by side with the original (eager fp32) on {platform.machine()} "
            f"({load_text(r.load_average)} when the search ended). "
            f"Core ML files are scored with tbopt's reference executor off macOS; their device latency needs "
            f"Apple hardware.")
