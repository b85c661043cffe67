"""Where Core ML will run each op of a file: coremltools' ``MLComputePlan`` (macOS 14.4 and later).

Core ML decides per op whether the CPU, the GPU or the Neural Engine runs it, when it loads the
model. One op that the Neural Engine does not take (a norm it does not support, an fp32 op) sends
its tensors to another processor and back, and can cost more than the rest of the model: a
TinyBeauty whose norm fell off the Neural Engine ran many times slower on an iPhone than one
whose norm stayed on it. The plan names those ops before anyone measures on a device.

Only Core ML itself knows the plan, so this needs macOS; elsewhere :func:`compute_plan` refuses
in one line. Ops that hold constants (weights) get no device and are left out.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UnsupportedError
from .spec import coremltools, private_copy
from .units import ComputeUnits

NEURAL_ENGINE = "Neural Engine"
NEEDS = "--compute-plan needs Core ML itself: macOS 14.4 or later (coremltools' MLComputePlan)"


@dataclass
class OpPlacement:
    """One op (ML Program) or layer (NeuralNetwork) and where Core ML prefers to run it."""

    name: str  # its first output's name (ML Program) or the layer's name
    op: str  # the operator ("conv", "layer_norm") or the layer type
    preferred: str | None  # "CPU", "GPU", "Neural Engine", or None when Core ML did not say
    supported: list[str]
    cost: float | None  # share of the model's estimated work, 0..1 (ML Programs only)


@dataclass
class ComputePlan:
    path: str
    compute_units: str
    ops: list[OpPlacement] = field(default_factory=list)

    def by_device(self) -> dict[str, dict[str, Any]]:
        """Ops and estimated cost share per preferred device."""
        out: dict[str, dict[str, Any]] = {}
        for o in self.ops:
            d = out.setdefault(o.preferred or "unknown", {"ops": 0, "cost": 0.0})
            d["ops"] += 1
            d["cost"] += o.cost or 0.0
        return out

    def off_neural_engine(self) -> list[OpPlacement]:
        """The ops Core ML will not run on the Neural Engine (each one a round trip off it)."""
        return [o for o in self.ops if o.preferred != NEURAL_ENGINE]

    def summary(self) -> str:
        off = self.off_neural_engine()
        if not off:
            return f"every op of the {len(self.ops)} runs on the Neural Engine"
        if len(off) == len(self.ops):
            return f"no op runs on the Neural Engine with compute units {self.compute_units}"
        names = ", ".join(f"{o.name} ({o.op}, {o.preferred or 'unknown'})" for o in off)
        return f"{len(off)} of {len(self.ops)} ops leave the Neural Engine: {names}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "compute_units": self.compute_units, "ops": [asdict(o) for o in self.ops],
                "by_device": self.by_device(), "off_neural_engine": [o.name for o in self.off_neural_engine()],
                "summary": self.summary(), "macos": platform.mac_ver()[0] or None}


def _device(dev: Any, ct: Any) -> str | None:
    cd = ct.models.compute_device
    for cls, name in ((cd.MLNeuralEngineComputeDevice, NEURAL_ENGINE), (cd.MLGPUComputeDevice, "GPU"),
                      (cd.MLCPUComputeDevice, "CPU")):
        if isinstance(dev, cls):
            return name
    return None


def compute_plan(path: Path | str, compute_units: ComputeUnits | None = None) -> ComputePlan:
    """Core ML's plan for ``path`` (.mlmodel or .mlpackage): per op, the preferred device and cost."""
    from .runner import coreml_available  # noqa: PLC0415 - the one test of "can Core ML run here"

    if not coreml_available():
        raise UnsupportedError(f"{NEEDS}; this is {platform.system() or sys.platform}",
                               hint="run tbopt info --compute-plan on a Mac, or open the file in Xcode's "
                                    "Performance report")
    units = compute_units or ComputeUnits.all
    ct = coremltools()
    copy, holder = private_copy(path)  # coremltools rewrites a package's Manifest.json
    try:
        model = ct.models.MLModel(copy, compute_units=units.coreml())
        try:
            plan = ct.models.compute_plan.MLComputePlan.load_from_path(model.get_compiled_path(),
                                                                       compute_units=units.coreml())
        except (ValueError, TypeError, AttributeError) as exc:  # before macOS 14.4 the proxy is missing
            raise UnsupportedError(f"{NEEDS}; Core ML here has none ({exc})") from exc
        result = ComputePlan(str(path), units.value)
        structure = plan.model_structure
        if structure.program is not None:
            for fn in structure.program.functions.values():
                for op in fn.block.operations:
                    usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                    if usage is None:  # constants: no device, no cost
                        continue
                    cost = plan.get_estimated_cost_for_mlprogram_operation(op)
                    result.ops.append(OpPlacement(
                        op.outputs[0].name if op.outputs else op.operator_name, op.operator_name,
                        _device(usage.preferred_compute_device, ct),
                        [d for d in (_device(s, ct) for s in usage.supported_compute_devices) if d],
                        None if cost is None else round(float(cost.weight), 4)))
        elif structure.neuralnetwork is not None:
            for layer in structure.neuralnetwork.layers:
                usage = plan.get_compute_device_usage_for_neuralnetwork_layer(layer)
                if usage is None:
                    continue
                result.ops.append(OpPlacement(
                    layer.name, layer.type, _device(usage.preferred_compute_device, ct),
                    [d for d in (_device(s, ct) for s in usage.supported_compute_devices) if d], None))
        return result
    finally:
        if holder is not None:
            holder.cleanup()
