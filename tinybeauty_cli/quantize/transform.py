"""int8 static post-training quantization of a float module: module in, int8 TorchScript out.

What :func:`quantize_module` does, in order:

1. **Rewrite** the float network into an exactly equivalent graph that is fast on a CPU
   (:mod:`.graph_rewrites`: fast norms, sub-pixel form of upsample + conv, equalized channel
   ranges).
2. **Calibrate**: FX graph-mode quantization (``torch.ao.quantization.quantize_fx``) puts
   observers on every convolution / linear layer; the calibration images run through the
   float network. Weights get per-channel scales where the backend supports them.
3. **Choose what stays float and the engine** (:mod:`.engines`): only convolutions run in
   int8; the most sensitive layers stay float until the fidelity target is met on the
   calibration images; the fastest engine that meets it wins.
4. **Lower** to a frozen TorchScript module (:mod:`.lowering`).

It opens and writes no file and never sees the evaluation images: writing the archive and
scoring it are the ``tbopt quantize`` command's (``flow.quantize``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..core.counts import count_macs
from ..core.errors import ConfigError, UnsupportedError
from ..core.progress import Progress, SilentProgress
from ..core.quality import made_up
from .config import EQUALIZE_IMAGES, SELECTION_RUNS, QuantizeConfig
from .engines import Quantizer, choose_backend, layers_of, resolve_keep_float, usable_backends
from .graph_rewrites import TraceError, optimize_graph
from .lowering import engine_label
from .results import QuantizeOutcome, rounded


def quantize_module(model: nn.Module, config: QuantizeConfig, calib: torch.Tensor, *, output: str = "residual",
                    progress: Progress | None = None) -> tuple[torch.jit.ScriptModule, QuantizeOutcome]:
    """The int8 TorchScript version of ``model`` and what was decided on the way.

    ``calib`` holds the calibration images as the model takes them: float32 (N, 3, S, S) in
    [-1, 1]. ``output`` says what the network returns: ``"residual"`` (the image is
    ``clamp(x + r)``) or ``"image"``. ``model`` is put in eval mode and otherwise left as it is.
    The returned module's weights are packed for ``outcome.backend``: save or reload it with
    that quantized engine borrowed (``core.contexts.quantized_engine``).
    """
    cfg = config
    progress = progress or SilentProgress()
    timings: dict[str, float] = {}
    notes: list[str] = []
    model = model.eval()

    try:
        with progress.task("graph rewrites (exact, checked on calibration images)", total=None):
            graph, rewrites = optimize_graph(model, calib[:2], images=calib[:EQUALIZE_IMAGES])
    except TraceError as exc:
        raise UnsupportedError(f"the network cannot be traced into a static graph for quantization ({exc})",
                               hint="FX graph-mode quantization needs a forward() without data-dependent "
                                    "control flow") from None
    if rewrites.skipped:
        notes.append(rewrites.skipped)
    layers = layers_of(model, graph, rewrites)
    if not layers:
        raise UnsupportedError("the network has no convolution or linear layer to quantize")
    forced = resolve_keep_float(cfg.keep_float, layers) if isinstance(cfg.keep_float, tuple) else set()
    if len(forced) == len(layers):
        raise ConfigError("--keep-float keeps every layer in float: there is nothing left to quantize")

    sens_x = calib[:cfg.sensitivity_images]
    with torch.no_grad():
        sens_ref = made_up(sens_x.numpy(), graph(sens_x).float().numpy(), output)
    quantizer = Quantizer(graph, layers, calib[:1], output)

    t0 = time.perf_counter()
    backends, trials = usable_backends(cfg.backend, progress)
    threads = cfg.effective_threads  # the threads of use: the engine is chosen where the file will run
    plan, reason, more_notes, float_ms = choose_backend(
        quantizer, backends, trials, cfg, forced, calib, sens_x, sens_ref, model, threads, progress, timings)
    notes.extend(more_notes)
    int8_layers = {d.name for d in plan.decisions if d.quantized}
    per_tensor = [name for name in quantizer.per_tensor_layers(plan.backend) if name in int8_layers]
    if per_tensor:
        notes.append(f"{', '.join(per_tensor)}: one int8 weight scale per tensor, not per channel as {plan.backend} "
                     "gives the other convolutions (PyTorch quantizes transposed convolutions per tensor only)")
    if float_ms is not None and plan.latency_ms >= float_ms:
        notes.append(f"the chosen {plan.backend} int8 model ({plan.latency_ms:.1f} ms) was not faster than the "
                     f"float model ({float_ms:.1f} ms) when the engines were ranked")
    for t in trials:
        if t.backend == plan.backend:
            t.status = "chosen"
    timings["backend_selection_s"] = (time.perf_counter() - t0 - timings.get("calibration_s", 0.0)
                                      - timings.get("keep_float_s", 0.0))

    outcome = QuantizeOutcome(
        backend=plan.backend, backend_reason=reason, engine=engine_label(plan.backend), backends=trials,
        rewrites=rewrites, layers=plan.decisions, keep_float_steps=plan.steps,
        calibration_fidelity_db=plan.fidelity_db, sensitivity_images=len(sens_x),
        macs=count_macs(graph, calib.shape[-1]), stored_weights=sum(p.numel() for p in graph.parameters()),
        timings=timings, notes=notes,
        ranking={"threads": threads, "runs": SELECTION_RUNS, "float_ms": rounded(float_ms),
                 "measure": "fastest of the runs, engines interleaved with each other and the float model"})
    return plan.script, outcome
