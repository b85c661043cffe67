"""tbopt info: what a model file is."""

from __future__ import annotations

from typing import Annotated

import typer

from . import _output
from ._errors import handle_errors
from ._options import (
    ArchKwargsOpt,
    ArchOpt,
    ArtifactArg,
    ComputeUnitsOpt,
    JsonOpt,
    TrustPickleOpt,
    model_options,
)


@handle_errors
def info(
    artifact: ArtifactArg = None,
    json_out: JsonOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    compute_plan: Annotated[bool, typer.Option(
        "--compute-plan", help="Core ML files, on macOS 14.4+: where Core ML will run each op (CPU, GPU or Neural "
                               "Engine) and its estimated cost, and which ops leave the Neural Engine. Elsewhere: "
                               "an error (exit 1), as only Core ML knows its plan.", rich_help_panel="Core ML")] = False,
    compute_units: ComputeUnitsOpt = None,
) -> None:
    """Architecture, parameters, MACs, size on disk and zipped, preprocessing and history of a model."""
    from ..measure.describe import describe  # noqa: PLC0415 - torch, only when the command runs

    out = _output.Output(json_mode=json_out)
    path = out.model_or_demo(artifact)
    plan = None
    if compute_plan:
        from ..core.errors import UsageError  # noqa: PLC0415
        from ..coreml.compute_plan import compute_plan as make_plan  # noqa: PLC0415 - coremltools

        if path.suffix not in (".mlmodel", ".mlpackage"):
            raise UsageError(f"--compute-plan takes a Core ML file (.mlmodel or .mlpackage), not {path.name}")
        plan = make_plan(path, compute_units)
    data = describe(path, **model_options(arch, arch_kwargs, trust_pickle))
    if plan is not None:
        data["compute_plan"] = plan.to_dict()
    for problem in data.get("problems", ()):
        out.warn(f"{problem} (every other tbopt command refuses this model)")
    out.emit(data, render_info)


def render_info(out: _output.Output, d: dict) -> None:
    items = {
        "file": d["path"],
        "found": d.get("found"),
        "kind": f"{d['kind']} ({d['engine']})",
        "architecture": d.get("architecture"),
        "parameters": d.get("parameters"),
        "non-zero parameters": _nonzero(d),
        "MACs": f"{d['macs'] / 1e9:.3f} G at {d.get('preprocessing', {}).get('size', '?')}px" if d.get("macs") else None,
        "size on disk": f"{_output.kb(d['size_bytes'])} KB ({d['size_bytes']:,} B)",
        "size zipped": f"{_output.kb(d['zipped_bytes'])} KB ({d['zipped_bytes']:,} B)",
        "preprocessing": _prep(d.get("preprocessing")),
        "sha256": d["sha256"],
        "usable": "NO: " + "; ".join(d["problems"]) if d.get("problems") else None,
    }
    for k, v in d.items():
        if k.startswith("coreml_") or k in ("format", "target", "precision"):
            items[k] = v
    out.fields(None, {k: v for k, v in items.items() if v is not None})
    if plan := d.get("compute_plan"):
        out.table(f"compute plan ({plan['compute_units']}): where Core ML runs each op",
                  ["op", "operator", "device", "supported", "cost"],
                  [(o["name"], o["op"], o["preferred"] or "-", ", ".join(o["supported"]) or "-",
                    "-" if o["cost"] is None else f"{100 * o['cost']:.1f}%") for o in plan["ops"]],
                  right=("cost",))
        shares = ", ".join(f"{dev} {v['ops']} ops ({100 * v['cost']:.0f}% of the cost)"
                           for dev, v in plan["by_device"].items())
        out.line(f"compute plan: {shares}")
        out.line(f"compute plan: {plan['summary']}")
    history = d.get("history") or []
    if history:
        out.table("history", ["#", "step", "when", "configuration", "figures"],
                  [(i + 1, h["step"], h.get("time", ""), _compact(h.get("config")), _compact(h.get("figures")))
                   for i, h in enumerate(history)])
    else:
        out.line("history: none (not produced by tbopt)")


def _nonzero(d: dict) -> str | None:
    if d.get("nonzero_parameters") is None or not d.get("parameters"):
        return None
    nz, total = d["nonzero_parameters"], d["parameters"]
    return f"{nz:,} ({100 * (1 - nz / total):.1f}% zeros)"


def _prep(p: dict | None) -> str | None:
    if not p:
        return None
    lo, hi = p["value_range"]
    return f"{p['size']}x{p['size']} RGB, values in [{lo:g}, {hi:g}], network returns a {p['output']}"


def _compact(d: dict | None) -> str:
    if not d:
        return ""
    return ", ".join(f"{k}={v}" for k, v in d.items())
