"""What a pruning step did: per-layer shapes and zeros, channel groups, before/after totals, the notes
that explain the method's limits. No torch here: the CLI renders these without importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import PruneConfig, PruneMethod


@dataclass
class ChannelGroup:
    """Channels that must be removed together: one index space shared by coupled layers."""

    layers: list[str]  # convs whose output channels are this group, in graph order
    consumers: list[str]  # convs reading these channels
    channels_before: int
    channels_after: int
    removed: list[int]
    importance: list[float]  # per channel, before pruning (higher = kept)
    left_whole: str = ""  # why a group that was to be cut was left whole (the network could not run cut)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "consumers": self.consumers, "channels_before": self.channels_before,
                "channels_after": self.channels_after, "removed": self.removed,
                "importance": [round(v, 5) for v in self.importance],
                **({"left_whole": self.left_whole} if self.left_whole else {})}



@dataclass
class LayerReport:
    name: str
    kind: str
    shape_before: list[int]
    shape_after: list[int]
    weights_before: int
    weights_after: int
    nonzero_after: int
    excluded: bool = False
    threshold: float | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of the remaining weights that are zero."""
        return 1.0 - self.nonzero_after / self.weights_after if self.weights_after else 0.0

    @property
    def removed_fraction(self) -> float:
        """Fraction of the original weights that are gone or zero."""
        return 1.0 - self.nonzero_after / self.weights_before if self.weights_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = round(self.sparsity, 5)
        d["removed_fraction"] = round(self.removed_fraction, 5)
        return d


@dataclass
class ModelTotals:
    parameters: int
    nonzero_parameters: int
    macs: int
    size_bytes: int | None = None
    zipped_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneReport:
    """Everything ``tbopt prune`` prints (the same dict ``--json`` prints)."""

    input: str | None  # the file pruned (None for a module pruned in memory)
    output: str | None  # the file written
    architecture: str
    size: int  # model input size (px) at which MACs are counted
    config: PruneConfig
    layers: list[LayerReport]
    groups: list[ChannelGroup]
    before: ModelTotals
    after: ModelTotals
    quality: dict[str, Any]
    finetune: dict[str, Any]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        def r(a: int | None, b: int | None) -> float | None:
            return None if a is None or not b else round(a / b, 4)
        return {
            "parameters": r(self.after.parameters, self.before.parameters),
            "nonzero_parameters": r(self.after.nonzero_parameters, self.before.nonzero_parameters),
            "macs": r(self.after.macs, self.before.macs),
            "size_bytes": r(self.after.size_bytes, self.before.size_bytes),
            "zipped_bytes": r(self.after.zipped_bytes, self.before.zipped_bytes),
        }

    def figures(self) -> dict[str, Any]:
        """The short summary kept in the artifact's history."""
        return {
            "parameters": self.after.parameters,
            "nonzero_parameters": self.after.nonzero_parameters,
            "macs": self.after.macs,
            "parameters_before": self.before.parameters,
            "macs_before": self.before.macs,
            **{k: v for k, v in self.quality.items() if k.endswith("_db")},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "architecture": self.architecture,
            "size": self.size,
            "method": self.config.method,
            "rate": self.config.rate,
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "groups": [g.to_dict() for g in self.groups],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "ratios": self.ratios(),
            "quality": self.quality,
            "finetune": self.finetune,
            "seconds": self.seconds,
            "notes": self.notes,
        }


def method_notes(cfg: PruneConfig, rows: list[LayerReport], groups: list[ChannelGroup],
                 excluded: set[str]) -> list[str]:
    """What the method can and cannot do, as measured on this step (shown under the tables)."""
    notes = []
    if cfg.method in (PruneMethod.magnitude.value, PruneMethod.global_.value) and cfg.rate > 0:
        notes.append("unstructured pruning: the zeros are still stored and still multiplied, so the dense file "
                     "keeps its size and dense inference (PyTorch, Core ML) is not faster; the zipped size "
                     "shrinks, and a sparse format or runtime could use the zeros")
        pruned = [r for r in rows if not r.excluded]
        if cfg.method == PruneMethod.global_.value and pruned:
            lo = min(pruned, key=lambda r: r.sparsity)
            hi = max(pruned, key=lambda r: r.sparsity)
            notes.append(f"one threshold for all layers prunes them unevenly: from {lo.sparsity:.1%} "
                         f"({lo.name}, {lo.weights_after:,} weights) to {hi.sparsity:.1%} "
                         f"({hi.name}, {hi.weights_after:,} weights)")
    if cfg.method == PruneMethod.channel.value and cfg.any_pruning:
        cut = [g for g in groups if not g.left_whole]
        if cut:
            kept = sorted({(g.channels_before, g.channels_after) for g in cut})
            shown = ", ".join(f"{b} -> {a}" for b, a in kept)
            notes.append(f"{len(cut)} channel groups pruned (channels {shown}); the network's input and "
                         f"output channels are kept")
        else:
            notes.append("no channel group could be pruned at this rate")
        for g in groups:
            if g.left_whole:
                notes.append(f"channels of {', '.join(g.layers)} left whole: cut, the network no longer runs "
                             f"({g.left_whole}); torch-pruning does not know how to cut through one of its ops")
    if excluded:
        notes.append(f"excluded from pruning: {', '.join(sorted(excluded))}")
    return notes
