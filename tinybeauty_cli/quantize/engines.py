"""Engine search: which quantized engines to try, calibration per engine's qconfigs, per-layer
sensitivity and the layers kept float, and the choice of the fastest engine that meets the
fidelity target.

Only convolutions (and linear layers) run in int8. Norms, activations, residual adds,
concatenation and padding stay float (channels-last): their quantized kernels were what made
plain FX int8 of TinyBeauty slower than fp32. With ``keep_float="auto"`` each layer is quantized
alone to measure its sensitivity, and the most sensitive layers stay float until the fidelity
target is met. With ``backend="auto"`` every quantized engine this PyTorch supports, except one
that warns about accuracy on this CPU, is timed at the threads the file will run with; the fastest
that meets the target wins.
Fidelity is measured on calibration images only.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from ..core.contexts import quantized_engine
from ..core.errors import ConfigError, UnsupportedError
from ..core.progress import Progress
from ..core.quality import fidelity_psnr_db, made_up
from ..runtime.timing import measure_latencies
from .config import BACKENDS, CALIB_BATCH, SELECTION_RUNS, QuantizeConfig
from .fx_passes import fold_relu_into_quantize, inline_quantization_params, isolate_list_inputs, lean_quantized_convs
from .graph_rewrites import LEAF_MODULES, RewriteReport, quantizable_layers
from .lowering import lower_to_torchscript, quiet
from .results import BackendTrial, LayerDecision, rounded

#: How calibration observes, as the report and the archive's metadata state it.
OBSERVERS = ("HistogramObserver activations (per tensor), weights per the backend's default (per channel "
             "except qnnpack)")

# ---------------------------------------------------------------------------------------------
# backends


def backend_qconfig_mapping(backend: str):
    """PyTorch's default PTQ qconfig mapping for ``backend`` and the warnings it raised (as text)."""
    from torch.ao.quantization import get_default_qconfig_mapping

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapping = get_default_qconfig_mapping(backend)
    notes = [str(w.message) for w in caught if "accuracy" in str(w.message).lower()]
    return mapping, notes


def accuracy_warning(backend: str) -> str | None:
    """The accuracy warning PyTorch gives for ``backend`` on this CPU, if any."""
    _, notes = backend_qconfig_mapping(backend)
    return notes[0] if notes else None


def supported_backends() -> list[str]:
    """The quantized engines this PyTorch build has, in tbopt's order."""
    return [b for b in BACKENDS if b in torch.backends.quantized.supported_engines]


def usable_backends(requested: str, progress: Progress) -> tuple[list[str], list[BackendTrial]]:
    """Backends to try and the ones excluded (with why)."""
    supported = supported_backends()
    if requested != "auto":
        if requested not in supported:
            raise UnsupportedError(f"backend {requested} is not available in this PyTorch build "
                                   f"(supported here: {', '.join(supported) or 'none'})",
                                   hint="use --backend auto")
        warning = accuracy_warning(requested)
        if warning:
            progress.note(f"Warning: {requested} on this CPU: {warning}")
        return [requested], []
    if not supported:
        raise UnsupportedError("this PyTorch build has no quantized CPU engine (torch.backends.quantized."
                               "supported_engines is empty)")
    chosen, excluded = [], []
    for b in BACKENDS:
        if b not in supported:
            continue
        warning = accuracy_warning(b)
        if warning:
            excluded.append(BackendTrial(b, "excluded", f"PyTorch warns on this CPU: {warning}"))
        else:
            chosen.append(b)
    if not chosen:
        raise UnsupportedError("every quantized engine warns about accuracy on this CPU",
                               hint=f"choose one explicitly with --backend ({', '.join(supported)})")
    return chosen, excluded


def _qconfig_key(qconfig) -> str:
    """Backends whose qconfigs observe the same statistics share one calibration."""
    def desc(factory) -> str:
        p = getattr(factory, "p", None)
        if p is None:
            return repr(factory)
        return f"{p.func.__name__}({sorted((k, repr(v)) for k, v in p.keywords.items())})"
    return f"{desc(qconfig.activation)}|{desc(qconfig.weight)}"


# ---------------------------------------------------------------------------------------------
# the quantizer proper


def _transposed(module: nn.Module) -> bool:
    return isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def _per_channel(qconfig) -> bool:
    if qconfig is None or qconfig.weight is None:
        return False
    return qconfig.weight().qscheme in (torch.per_channel_symmetric, torch.per_channel_affine,
                                        torch.per_channel_affine_float_qparams)


def _valid_for(module: nn.Module, qconfig):
    """``qconfig`` as ``module`` can take it: a transposed convolution gets per-tensor weight scales
    where the backend's default asks for per-channel ones (onednn's mapping does; torch.ao then refuses
    the layer: "Per channel weight observer is not supported yet for ConvTranspose{n}d"). The
    per-tensor observer is the one PyTorch's own x86 and fbgemm mappings give transposed convolutions."""
    if not (_transposed(module) and _per_channel(qconfig)):
        return qconfig
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import default_weight_observer

    return QConfig(activation=qconfig.activation, weight=default_weight_observer)


@dataclass
class Layer:
    """A quantizable layer, by its name in the float model and in the rewritten graph."""

    name: str  # in the float model
    graph_name: str  # in the rewritten graph (a sub-pixel conv's inner 2x2 conv)
    kind: str


class Quantizer:
    """One rewritten float graph, calibrated per qconfig, converted with any subset of layers in int8."""

    def __init__(self, graph: fx.GraphModule, layers: list[Layer], example: torch.Tensor, output: str = "residual"):
        self.output = output  # what the network returns: "residual" or "image"
        self.graph = copy.deepcopy(graph)
        isolate_list_inputs(self.graph)
        self.layers = layers
        self.example = example
        self._prepared: dict[str, tuple[fx.GraphModule, dict[str, Any]]] = {}

    def qconfigs(self, backend: str) -> dict[str, Any]:
        mapping, _ = backend_qconfig_mapping(backend)
        by_type = mapping.object_type_qconfigs
        out = {}
        for layer in self.layers:
            module = self.graph.get_submodule(layer.graph_name)
            out[layer.graph_name] = _valid_for(module, by_type.get(type(module), mapping.global_qconfig))
        return out

    def per_tensor_layers(self, backend: str) -> list[str]:
        """Layers (float-model names) whose weights get one scale although ``backend`` scales per channel:
        PyTorch has no per-channel weight observer for transposed convolutions."""
        mapping, _ = backend_qconfig_mapping(backend)
        by_type = mapping.object_type_qconfigs
        modules = {layer.name: self.graph.get_submodule(layer.graph_name) for layer in self.layers}
        return [name for name, m in modules.items()
                if _transposed(m) and _per_channel(by_type.get(type(m), mapping.global_qconfig))]

    def key(self, backend: str) -> str:
        return "+".join(_qconfig_key(q) for q in self.qconfigs(backend).values())

    def prepare(self, backend: str) -> tuple[fx.GraphModule, dict[str, Any]]:
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import prepare_fx

        qconfigs = self.qconfigs(backend)
        mapping = QConfigMapping()
        for name, qc in qconfigs.items():
            mapping.set_module_name(name, qc)
        custom = PrepareCustomConfig().set_non_traceable_module_classes(list(LEAF_MODULES))
        with quiet():
            prepared = prepare_fx(copy.deepcopy(self.graph), mapping, (self.example,), prepare_custom_config=custom)
        return prepared, qconfigs

    def calibrated(self, backend: str, calib: torch.Tensor, progress: Progress, label: str):
        """The prepared model for ``backend``'s qconfigs, having observed every image of ``calib``.

        Backends with the same qconfigs share one prepared model; images it has already
        seen (a prefix of ``calib``) are not run again.
        """
        key = self.key(backend)
        if key not in self._prepared:
            self._prepared[key] = (*self.prepare(backend), 0)
        prepared, qconfigs, seen = self._prepared[key]
        if seen < len(calib):
            with torch.no_grad(), progress.task(label, total=len(calib) - seen) as advance:
                for i in range(seen, len(calib), CALIB_BATCH):
                    batch = calib[i:min(i + CALIB_BATCH, len(calib))]
                    prepared(batch)  # NCHW: the histogram observers copy channels-last tensors first
                    advance(len(batch))
            self._prepared[key] = (prepared, qconfigs, len(calib))
        return prepared, qconfigs

    def observed_once(self, backend: str, x: torch.Tensor):
        """A copy of the prepared model for ``backend``'s qconfigs that has observed ``x`` alone: enough to
        convert and time an engine's all-int8 model. The calibration proper (:meth:`calibrated`) starts
        afresh from the first image, in the batches a run with that engine pinned uses, so that the file
        an engine ranking chooses is the file ``--backend`` that engine makes."""
        key = self.key(backend)
        if key not in self._prepared:
            self._prepared[key] = (*self.prepare(backend), 0)
        prepared, qconfigs, _seen = self._prepared[key]
        copied = copy.deepcopy(prepared) if _seen == 0 else self.prepare(backend)[0]
        with torch.no_grad():
            copied(x)
        return copied, qconfigs

    def convert(self, prepared_and_qconfigs, backend: str, quantize: set[str]) -> fx.GraphModule:
        """A copy of the calibrated model with only the graph layers in ``quantize`` in int8."""
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.quantize_fx import convert_fx

        prepared, qconfigs = prepared_and_qconfigs
        mapping = QConfigMapping()
        for name, qc in qconfigs.items():
            mapping.set_module_name(name, qc if name in quantize else None)
        with quiet(), quantized_engine(backend):
            converted = convert_fx(copy.deepcopy(prepared), qconfig_mapping=mapping)
        return lean_quantized_convs(fold_relu_into_quantize(inline_quantization_params(converted)))


def _fidelity(q: Quantizer, module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              reference: np.ndarray) -> float:
    """Fidelity of ``module``'s made-up images of ``x`` against the float graph's (``reference``)."""
    with torch.no_grad(), quiet():
        out = module(x.contiguous(memory_format=torch.channels_last)).float().contiguous().numpy()
    return fidelity_psnr_db(made_up(x.numpy(), out, q.output), reference)


def fastest_runs(fns: Mapping[str, Callable[[], object]], threads: int, runs: int = SELECTION_RUNS) -> dict[str, float]:
    """Fastest of ``runs`` interleaved calls of each function (ms): for ranking, the minimum is the
    estimate least hurt by other processes, and interleaving gives every function the same conditions."""
    with torch.inference_mode(), quiet():
        lat = measure_latencies(dict(fns), runs=runs, warmup=2, threads=threads)
    return {k: v.min_ms for k, v in lat.items()}


@dataclass
class Plan:
    """One engine's lowered model with its float layers chosen, and how it fares."""

    backend: str
    quantize: set[str]  # graph names in int8
    fidelity_db: float
    latency_ms: float
    script: torch.jit.ScriptModule
    decisions: list[LayerDecision]
    steps: list[dict[str, Any]]


def plan_backend(q: Quantizer, backend: str, cfg: QuantizeConfig, forced: set[str], calib: torch.Tensor,
                 sens_x: torch.Tensor, sens_ref: np.ndarray, progress: Progress, timings: dict[str, float]) -> Plan:
    """Calibrate for ``backend``, choose the float layers, lower; fidelity on the calibration subset."""
    t0 = time.perf_counter()
    cal = q.calibrated(backend, calib, progress, f"calibrating ({backend})")
    timings["calibration_s"] = timings.get("calibration_s", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    by_graph = {layer.graph_name: layer for layer in q.layers}
    candidates = {layer.graph_name for layer in q.layers if layer.name not in forced}
    decisions = {layer.graph_name: LayerDecision(layer.name, layer.kind, layer.graph_name in candidates,
                                                 reason="int8" if layer.graph_name in candidates
                                                 else "kept float (--keep-float)")
                 for layer in q.layers}
    quantize = set(candidates)
    fid = _fidelity(q, q.convert(cal, backend, quantize), sens_x, sens_ref)
    steps = [{"kept_float": sorted(by_graph[g].name for g in set(by_graph) - quantize), "fidelity_db": rounded(fid)}]
    why = {"auto": f"int8 (with every layer in int8 the model reaches {fid:.2f} dB >= {cfg.min_psnr_db:g} dB)",
           "none": "int8 (--keep-float none)"}.get(cfg.keep_float if isinstance(cfg.keep_float, str) else "", "int8")
    for g in quantize:
        decisions[g].reason = why
    if cfg.keep_float == "auto" and fid < cfg.min_psnr_db:
        alone: dict[str, float] = {}
        with progress.task(f"layer sensitivity ({backend})", total=len(candidates)) as advance:
            for g in [layer.graph_name for layer in q.layers if layer.graph_name in candidates]:
                alone[g] = _fidelity(q, q.convert(cal, backend, {g}), sens_x, sens_ref)
                decisions[g].alone_fidelity_db = alone[g]
                advance(1)
        order = sorted(candidates, key=lambda g: alone[g])
        for rank, g in enumerate(order, 1):
            if fid >= cfg.min_psnr_db:
                break
            if len(quantize) == 1:
                raise UnsupportedError(
                    f"even with every other layer kept float, fidelity stays below --min-fidelity "
                    f"{cfg.min_psnr_db:g} dB ({fid:.2f} dB with only {by_graph[g].name} in int8)",
                    hint="lower --min-fidelity, or calibrate on images closer to what the model will see")
            quantize.discard(g)
            fid = _fidelity(q, q.convert(cal, backend, quantize), sens_x, sens_ref)
            decisions[g].quantized = False
            decisions[g].reason = (f"kept float: most sensitive #{rank} (alone in int8: {alone[g]:.2f} dB); "
                                   f"without it in int8 the model reaches {fid:.2f} dB")
            steps.append({"kept_float": sorted(by_graph[x].name for x in set(by_graph) - quantize),
                          "added": by_graph[g].name, "fidelity_db": rounded(fid)})
        for g in quantize:
            if g in alone:
                decisions[g].reason = f"int8 (alone: {alone[g]:.2f} dB)"
    timings["keep_float_s"] = timings.get("keep_float_s", 0.0) + time.perf_counter() - t0
    with quantized_engine(backend), progress.task(f"lowering to TorchScript ({backend})", total=None):
        script = lower_to_torchscript(q.convert(cal, backend, quantize), sens_x[:1])
    ordered = [decisions[layer.graph_name] for layer in q.layers]
    return Plan(backend, quantize, fid, math.nan, script, ordered, steps)


def choose_backend(q: Quantizer, backends: list[str], trials: list[BackendTrial], cfg: QuantizeConfig,
                   forced: set[str], calib: torch.Tensor, sens_x: torch.Tensor, sens_ref: np.ndarray,
                   float_model: nn.Module, threads: int, progress: Progress,
                   timings: dict[str, float]) -> tuple[Plan, str, list[str], float | None]:
    """The plan to write, why, notes, and the float model's time in the same comparison.

    ``threads`` are the threads the file will run with: engines are timed at them, because their
    order changes with the thread count (on a 2-core AVX2 CPU without VNNI, ``x86`` and ``fbgemm``
    tied single-threaded, and at 2 threads the ``x86`` file took nearly twice the ``fbgemm`` file's
    time); the fastest of several interleaved runs keeps a busy machine's noise out of the ranking.
    Every engine's all-int8 model is timed first (interleaved, with the float model); then, fastest
    first, each engine is calibrated and gets its float layers. Keeping layers float only adds time,
    so an engine whose all-int8 model is already slower than the best finished plan is skipped.
    Finished plans are compared in interleaved runs.
    """
    notes: list[str] = []
    x1 = sens_x[:1]
    if len(backends) == 1:
        plan = plan_backend(q, backends[0], cfg, forced, calib, sens_x, sens_ref, progress, timings)
        t = fastest_runs({"int8": lambda: plan.script(x1), "float": lambda: float_model(x1)}, threads)
        plan.latency_ms = t["int8"]
        trials.append(_trial(plan, None, cfg.min_psnr_db))
        reason = "requested with --backend" if cfg.backend != "auto" else "the only engine here without an accuracy warning"
        if plan.fidelity_db < cfg.min_psnr_db:
            notes.append(_missed(plan, cfg))
        return plan, reason, notes, t["float"]

    all_layers = {layer.graph_name for layer in q.layers}
    scripts: dict[str, torch.jit.ScriptModule] = {}
    with progress.task("timing engines", total=len(backends)) as advance:
        for b in backends:
            cal = q.observed_once(b, calib[:1])
            with quantized_engine(b):
                scripts[b] = lower_to_torchscript(q.convert(cal, b, all_layers), x1)
            advance(1)
    # packed weights keep the engine they were packed for: the models can be timed side by side
    quick = fastest_runs({**{b: (lambda s=s: s(x1)) for b, s in scripts.items()}, "float": lambda: float_model(x1)},
                         threads)
    float_ms = quick.pop("float")
    best: Plan | None = None
    done: list[Plan] = []
    for b in sorted(backends, key=lambda b: quick[b]):
        if best is not None and quick[b] >= best.latency_ms:
            trials.append(BackendTrial(b, "skipped", f"its all-int8 model ({quick[b]:.1f} ms) is already slower than "
                                                     f"{best.backend}'s final model ({best.latency_ms:.1f} ms)",
                                       all_int8_latency_ms=quick[b]))
            continue
        plan = plan_backend(q, b, cfg, forced, calib, sens_x, sens_ref, progress, timings)
        rivals = {"new": lambda: plan.script(x1)}
        if best is not None:
            rivals["best"] = lambda: best.script(x1)
        t = fastest_runs(rivals, threads)
        plan.latency_ms = t["new"]
        if best is not None:
            best.latency_ms = t["best"]
        done.append(plan)
        trials.append(_trial(plan, quick[b], cfg.min_psnr_db))
        if plan.fidelity_db >= cfg.min_psnr_db and (best is None or plan.latency_ms < best.latency_ms):
            best = plan
    for trial in trials:  # latencies of finished plans as last compared
        match = next((p for p in done if p.backend == trial.backend), None)
        if match is not None:
            trial.latency_ms = match.latency_ms
    if best is not None:
        reason = (f"fastest at {threads} thread(s) of the {len(backends)} engines timed that meets "
                  f"{cfg.min_psnr_db:g} dB (best of {SELECTION_RUNS} interleaved runs)")
        return best, reason, notes, float_ms
    plan = max(done, key=lambda p: p.fidelity_db)
    notes.append(_missed(plan, cfg))
    return plan, f"no engine reaches {cfg.min_psnr_db:g} dB; the one with the highest fidelity", notes, float_ms


def _missed(plan: Plan, cfg: QuantizeConfig) -> str:
    return (f"fidelity {plan.fidelity_db:.2f} dB on the calibration images is below --min-fidelity "
            f"{cfg.min_psnr_db:g} dB (--keep-float {_keep_float_text(cfg)})")


def resolve_keep_float(names: Sequence[str], layers: list[Layer]) -> set[str]:
    """Layer names (or module prefixes such as ``upconv2``) -> float-model layer names."""
    known = [layer.name for layer in layers]
    chosen: set[str] = set()
    for n in names:
        matches = [k for k in known if k == n or k.startswith(n + ".")]
        if not matches:
            shown = ", ".join(known[:8]) + (f" (+{len(known) - 8} more)" if len(known) > 8 else "")
            raise ConfigError(f"--keep-float: no quantizable layer named {n!r}; layers are: {shown}",
                              hint="run with --keep-float none --json to list every layer")
        chosen.update(matches)
    return chosen


def layers_of(model: nn.Module, graph: fx.GraphModule, rewrites: RewriteReport) -> list[Layer]:
    """The model's quantizable layers that the rewritten graph still calls, with their graph names."""
    called = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    layers = []
    for name in quantizable_layers(model):
        graph_name = rewrites.subpixel_layers.get(name, name)
        if name in rewrites.subpixel_layers or name in called:
            layers.append(Layer(name, graph_name, type(model.get_submodule(name)).__name__))
    return layers


def _trial(plan: Plan, all_int8_ms: float | None, min_psnr_db: float) -> BackendTrial:
    kept = [d.name for d in plan.decisions if not d.quantized]
    status = "meets target" if plan.fidelity_db >= min_psnr_db else "misses target"
    return BackendTrial(plan.backend, status, "", all_int8_ms, plan.latency_ms, plan.fidelity_db, kept)


def _keep_float_text(cfg: QuantizeConfig) -> str:
    return cfg.keep_float if isinstance(cfg.keep_float, str) else ",".join(cfg.keep_float)
