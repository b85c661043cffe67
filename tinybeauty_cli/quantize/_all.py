"""int8 static post-training quantization into a self-contained TorchScript file.

What :func:`quantize_model` does, in order:

1. **Rewrite** the float network into an exactly equivalent graph that is fast on a CPU
   (:mod:`.graph_rewrites`: fast norms, sub-pixel form of upsample + conv).
2. **Calibrate**: FX graph-mode quantization (``torch.ao.quantization.quantize_fx``) puts
   observers on every convolution / linear layer; real images (``--calib`` folder, or
   synthetic portraits that are never the test set) run through the float network.
   Weights get per-channel scales where the backend supports them.
3. **Choose what stays float**: only convolutions run in int8. Norms, activations,
   residual adds, concatenation and padding run in float (channels-last), because their
   quantized kernels were what made plain FX int8 slower than fp32 (DESIGN.md §2). The
   network's output residual is float, and the final ``clamp(x + r)`` is float too.
   With ``keep_float="auto"`` each layer is quantized alone to measure its sensitivity,
   and the most sensitive layers stay float until the fidelity target is met.
4. **Choose the backend** (``auto``): every quantized engine this PyTorch supports, except
   one that warns about accuracy on this CPU, is timed; the fastest that meets the
   fidelity target wins.
5. **Lower** to TorchScript: script, freeze (weights packed as constants), drop the
   source-range debug records, embed ``tbopt.json`` metadata. The file loads with
   ``torch.jit.load`` alone.
6. **Report** size, fidelity and PSNR against the test set's targets before and after,
   and latency before and after, measured on the file that was written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from .. import __version__
from ..core.checkpoint import (TORCHSCRIPT_META, HistoryStep, LoadedModel, Preprocessing, load_model)
from ..core.errors import ConfigError, ImageError, InputError, UnsupportedError
from .config import (ARCHIVE_FOLDER, BACKENDS, CALIB_BATCH, EQUALIZE_IMAGES, QUANTIZE_VERSION, SELECTION_RUNS,
                     TORCHSCRIPT_FORMAT, TORCHSCRIPT_FORMAT_VERSION, _ZIP_TIME, QuantizeConfig, parse_keep_float)
from ..measure.evaluate import evaluate
from ..core.quality import fidelity_psnr_db
from ..core.files import atomic_output, check_output, size_on_disk, zipped_size
from .graph_rewrites import (LEAF_MODULES, RewriteReport, TraceError, isolate_list_inputs, optimize_graph,
                             quantizable_layers)
from ..core.images import (PAIR_DIRS, ImageSet, builtin_test_set, list_images, read_image, synthetic_unlabeled,
                     to_model_size, uint8_to_model)
from ..runtime.timing import Latency, measure_latencies
from ..core.counts import count_macs, count_parameters
from ..core.progress import Progress, SilentProgress
from ..runtime.contexts import quantized_engine
from ..runtime.runners import TorchRunner

# ---------------------------------------------------------------------------------------------
# results


@dataclass
class LayerDecision:
    name: str  # as in the float model (e.g. "upconv2.conv")
    kind: str  # module type, e.g. "Conv2d"
    quantized: bool
    alone_fidelity_db: float | None = None  # fidelity with only this layer in int8 (sensitivity)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alone_fidelity_db"] = _r(self.alone_fidelity_db)
        return d


@dataclass
class BackendTrial:
    backend: str
    status: str  # "chosen" | "meets target" | "misses target" | "skipped" | "excluded"
    note: str = ""
    all_int8_latency_ms: float | None = None
    latency_ms: float | None = None
    fidelity_db: float | None = None  # on the calibration subset, with its kept-float layers
    kept_float: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("all_int8_latency_ms", "latency_ms", "fidelity_db"):
            d[k] = _r(d[k])
        return d


@dataclass
class QuantizeResult:
    input: str
    output: str
    config: QuantizeConfig
    backend: str
    backend_reason: str
    engine: str
    backends: list[BackendTrial]
    rewrites: RewriteReport
    calibration: dict[str, Any]
    layers: list[LayerDecision]
    keep_float_steps: list[dict[str, Any]]
    size: dict[str, Any]
    quality: dict[str, Any]
    latency: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    ranking: dict[str, Any] = field(default_factory=dict)  # how engines were compared: threads, runs, float ms

    @property
    def quantized_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.quantized]

    @property
    def float_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.quantized]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "config": self.config.to_dict(),
            "backend": self.backend, "backend_reason": self.backend_reason, "engine": self.engine,
            "backends": [b.to_dict() for b in self.backends], "ranking": dict(self.ranking),
            "rewrites": self.rewrites.to_dict(), "calibration": dict(self.calibration),
            "quantized_layers": self.quantized_layers, "float_layers": self.float_layers,
            "layers": [layer.to_dict() for layer in self.layers], "keep_float_steps": list(self.keep_float_steps),
            "size": dict(self.size), "quality": dict(self.quality), "latency": dict(self.latency),
            "timings": {k: round(v, 2) for k, v in self.timings.items()}, "notes": list(self.notes),
        }


def _r(v: float | None, nd: int = 3) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isinf(v) else round(v, nd)


# ---------------------------------------------------------------------------------------------
# inputs


def refuse_unquantizable(loaded: LoadedModel) -> None:
    """Only float models with weights can be quantized."""
    if loaded.kind == "torchscript":
        if loaded.metadata.get("quantized"):
            raise InputError(f"{loaded.path} is already an int8 model ({loaded.metadata.get('engine', 'int8')}); "
                             f"quantizing it again would only lose quality",
                             hint="quantize the float checkpoint it was made from")
        raise UnsupportedError(f"{loaded.path} is a TorchScript archive; tbopt quantize needs the float weights",
                               hint="give the checkpoint or tbopt artifact the TorchScript was made from")
    if loaded.artifact is not None and any(getattr(v, "is_quantized", False) for v in loaded.artifact.state_dict.values()):
        raise InputError(f"{loaded.path} already holds quantized tensors", hint="quantize a float checkpoint")


def calibration_images(calib: Path | None, count: int, size: int, progress: Progress) -> tuple[ImageSet, list[str]]:
    """``count`` calibration images: from a folder (unreadable files skipped), or synthetic portraits.

    Returns the images and the names of skipped files. A folder of pairs
    (``input``/``target``) is calibrated on its inputs.
    """
    if calib is None:
        return synthetic_unlabeled(count, size), []
    folder = Path(calib)
    if folder.is_dir():
        for a, _b in PAIR_DIRS:
            if (folder / a).is_dir() and not list_images(folder):
                folder = folder / a
                break
    files = list_images(folder)  # raises ImageError for a missing folder or a file
    arrays, names, skipped = [], [], []
    for path in files:
        if len(arrays) >= count:
            break
        try:
            arrays.append(to_model_size(read_image(path), size))
            names.append(path.stem)
        except ImageError:
            skipped.append(path.name)
    if not arrays:
        what = f"{len(files)} image file(s), none readable" if files else "no image files"
        raise ImageError(f"calibration folder {calib} has no readable images ({what})",
                         hint="give --calib a folder of face photos (png, jpg, ...) or leave it out "
                              "to calibrate on synthetic portraits")
    if skipped:
        progress.note(f"calibration: skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:3])}"
                      f"{' ...' if len(skipped) > 3 else ''}")
    if len(arrays) < count:
        progress.note(f"calibration: {calib} has {len(arrays)} readable image(s), fewer than --calib-count {count}")
    return ImageSet(names, np.stack(arrays), None, f"{calib} ({len(arrays)} images)"), skipped


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


def engine_label(backend: str) -> str:
    return f"PyTorch int8 {backend} (TorchScript)"


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


@dataclass
class _Layer:
    name: str  # in the float model
    graph_name: str  # in the rewritten graph (a sub-pixel conv's inner 2x2 conv)
    kind: str


class _Quantizer:
    """One rewritten float graph, calibrated per qconfig, converted with any subset of layers in int8."""

    def __init__(self, graph: fx.GraphModule, layers: list[_Layer], example: torch.Tensor, output: str = "residual"):
        self.output = output  # what the network returns: "residual" or "image"
        self.graph = copy.deepcopy(graph)
        isolate_list_inputs(self.graph)
        self.layers = layers
        self.example = example
        self._prepared: dict[str, tuple[fx.GraphModule, dict[str, Any]]] = {}

    def qconfigs(self, backend: str) -> dict[str, Any]:
        mapping, _ = backend_qconfig_mapping(backend)
        by_type = mapping.object_type_qconfigs
        return {layer.graph_name: by_type.get(type(self.graph.get_submodule(layer.graph_name)),
                                              mapping.global_qconfig) for layer in self.layers}

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
        with _quiet():
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

    def convert(self, prepared_and_qconfigs, backend: str, quantize: set[str]) -> fx.GraphModule:
        """A copy of the calibrated model with only the graph layers in ``quantize`` in int8."""
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.quantize_fx import convert_fx

        prepared, qconfigs = prepared_and_qconfigs
        mapping = QConfigMapping()
        for name, qc in qconfigs.items():
            mapping.set_module_name(name, qc if name in quantize else None)
        with _quiet(), quantized_engine(backend):
            converted = convert_fx(copy.deepcopy(prepared), qconfig_mapping=mapping)
        return fold_relu_into_quantize(inline_quantization_params(converted))


_PADS = (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d)


def fold_relu_into_quantize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop a float ReLU whose only way out is (padding and) quantization with zero point 0.

    ``quantize_per_tensor`` to quint8 with zero point 0 clamps negative values to 0, which is
    exactly what the ReLU did; padding copies values, so it commutes with the ReLU. One full
    pass over the activation saved (at 256x256 after the first conv and before the last).
    """
    def is_relu(node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(gm.get_submodule(node.target), nn.ReLU)
        return node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu)

    def is_pad(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _PADS)

    changed = False
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.quantize_per_tensor and len(node.args) == 4
                and node.args[2] == 0 and node.args[3] == torch.quint8):
            continue
        src = node.args[0]
        while isinstance(src, fx.Node) and is_pad(src) and len(src.users) == 1:
            src = src.args[0]
        if isinstance(src, fx.Node) and is_relu(src) and len(src.users) == 1:
            src.replace_all_uses_with(src.args[0])
            gm.graph.erase_node(src)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def inline_quantization_params(gm: fx.GraphModule) -> fx.GraphModule:
    """Activation scales and zero points as literals instead of 0-d tensor attributes.

    Each tensor constant is a separate record in a TorchScript archive (about 170 bytes of
    zip headers for 4 bytes of data); literals live in the code.
    """
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.quantize_per_tensor and len(node.args) == 4:
            x, scale, zero_point, dtype = node.args
            if all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (scale, zero_point)):
                node.args = (x, float(getattr(gm, scale.target)), int(getattr(gm, zero_point.target)), dtype)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
            if hasattr(gm, node.target):
                delattr(gm, node.target)
    graph.lint()
    gm.recompile()
    return gm


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch.ao.quantization and quantized tensors warn that they are deprecated in favour of
    # torchao; the user can do nothing about it, and the accuracy warnings are read separately.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _ChannelsLast(nn.Module):
    """Channels-last inside (what the int8 kernels use), plain NCHW at the boundary."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last)).contiguous()


def lower_to_torchscript(converted: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Script (trace if scripting fails) and freeze; quantized weights become packed constants."""
    wrapped = _ChannelsLast(converted).eval()
    with _quiet(), torch.no_grad():
        try:
            scripted = torch.jit.script(wrapped)
        except Exception:  # noqa: BLE001 - a user's network may use Python that only tracing understands
            scripted = torch.jit.trace(wrapped, example, check_trace=False)
        return torch.jit.freeze(scripted.eval())


def made_up(x: np.ndarray, out: np.ndarray, output: str) -> np.ndarray:
    """The made-up image from a network's output (a residual, or the image itself)."""
    return np.clip(out if output == "image" else x + out, -1.0, 1.0)


def _fidelity(q: "_Quantizer", module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              reference: np.ndarray) -> float:
    with torch.no_grad(), _quiet():
        out = module(x.contiguous(memory_format=torch.channels_last)).float().contiguous().numpy()
    return fidelity_psnr_db(made_up(x.numpy(), out, q.output), reference)


def fastest_runs(fns: Mapping[str, Callable[[], object]], threads: int, runs: int = SELECTION_RUNS) -> dict[str, float]:
    """Fastest of ``runs`` interleaved calls of each function (ms): for ranking, the minimum is the
    estimate least hurt by other processes, and interleaving gives every function the same conditions."""
    with torch.inference_mode(), _quiet():
        lat = measure_latencies(dict(fns), runs=runs, warmup=2, threads=threads)
    return {k: v.min_ms for k, v in lat.items()}


@dataclass
class _Plan:
    backend: str
    quantize: set[str]  # graph names in int8
    fidelity_db: float
    latency_ms: float
    script: torch.jit.ScriptModule
    decisions: list[LayerDecision]
    steps: list[dict[str, Any]]


def _plan_backend(q: _Quantizer, backend: str, cfg: QuantizeConfig, forced: set[str], calib: torch.Tensor,
                  sens_x: torch.Tensor, sens_ref: np.ndarray, progress: Progress, timings: dict[str, float]) -> _Plan:
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
    steps = [{"kept_float": sorted(by_graph[g].name for g in set(by_graph) - quantize), "fidelity_db": _r(fid)}]
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
                    f"even with every other layer kept float, fidelity stays below --min-psnr "
                    f"{cfg.min_psnr_db:g} dB ({fid:.2f} dB with only {by_graph[g].name} in int8)",
                    hint="lower --min-psnr, or calibrate on images closer to what the model will see")
            quantize.discard(g)
            fid = _fidelity(q, q.convert(cal, backend, quantize), sens_x, sens_ref)
            decisions[g].quantized = False
            decisions[g].reason = (f"kept float: most sensitive #{rank} (alone in int8: {alone[g]:.2f} dB); "
                                   f"without it in int8 the model reaches {fid:.2f} dB")
            steps.append({"kept_float": sorted(by_graph[x].name for x in set(by_graph) - quantize),
                          "added": by_graph[g].name, "fidelity_db": _r(fid)})
        for g in quantize:
            if g in alone:
                decisions[g].reason = f"int8 (alone: {alone[g]:.2f} dB)"
    timings["keep_float_s"] = timings.get("keep_float_s", 0.0) + time.perf_counter() - t0
    with quantized_engine(backend):
        script = lower_to_torchscript(q.convert(cal, backend, quantize), sens_x[:1])
    ordered = [decisions[layer.graph_name] for layer in q.layers]
    return _Plan(backend, quantize, fid, math.nan, script, ordered, steps)


#: Engines are ranked single-threaded. On a shared machine a multi-threaded batch-1 run waits at
#: every parallel region for a thread the OS has given to another process, and its time swings 10x
#: (measured here: 6 ms to 800 ms for the same model within minutes); single-threaded times keep
#: the engines' order. The latency in the report is measured with the requested threads.
RANKING_THREADS = 1


def _choose_backend(q: _Quantizer, backends: list[str], trials: list[BackendTrial], cfg: QuantizeConfig,
                    forced: set[str], calib: torch.Tensor, sens_x: torch.Tensor, sens_ref: np.ndarray,
                    float_model: nn.Module, threads: int, progress: Progress,
                    timings: dict[str, float]) -> tuple[_Plan, str, list[str], float | None]:
    """The plan to write, why, notes, and the float model's time in the same comparison.

    Every engine's all-int8 model is timed first (interleaved, with the float model); then, fastest
    first, each engine is calibrated and gets its float layers. Keeping layers float only adds time,
    so an engine whose all-int8 model is already slower than the best finished plan is skipped.
    Finished plans are compared in interleaved runs.
    """
    notes: list[str] = []
    x1 = sens_x[:1]
    if len(backends) == 1:
        plan = _plan_backend(q, backends[0], cfg, forced, calib, sens_x, sens_ref, progress, timings)
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
            cal = q.calibrated(b, calib[:1], SilentProgress(), "")  # calibration continues from here later
            with quantized_engine(b):
                scripts[b] = lower_to_torchscript(q.convert(cal, b, all_layers), x1)
            advance(1)
    # packed weights keep the engine they were packed for: the models can be timed side by side
    quick = fastest_runs({**{b: (lambda s=s: s(x1)) for b, s in scripts.items()}, "float": lambda: float_model(x1)},
                         threads)
    float_ms = quick.pop("float")
    best: _Plan | None = None
    done: list[_Plan] = []
    for b in sorted(backends, key=lambda b: quick[b]):
        if best is not None and quick[b] >= best.latency_ms:
            trials.append(BackendTrial(b, "skipped", f"its all-int8 model ({quick[b]:.1f} ms) is already slower than "
                                                     f"{best.backend}'s final model ({best.latency_ms:.1f} ms)",
                                       all_int8_latency_ms=quick[b]))
            continue
        plan = _plan_backend(q, b, cfg, forced, calib, sens_x, sens_ref, progress, timings)
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
        reason = (f"fastest of the {len(backends)} engines timed that meets {cfg.min_psnr_db:g} dB "
                  f"(best of {SELECTION_RUNS} runs, {threads} thread(s))")
        return best, reason, notes, float_ms
    plan = max(done, key=lambda p: p.fidelity_db)
    notes.append(_missed(plan, cfg))
    return plan, f"no engine reaches {cfg.min_psnr_db:g} dB; the one with the highest fidelity", notes, float_ms


def _missed(plan: _Plan, cfg: QuantizeConfig) -> str:
    return (f"fidelity {plan.fidelity_db:.2f} dB on the calibration images is below --min-psnr "
            f"{cfg.min_psnr_db:g} dB (--keep-float {_keep_float_text(cfg)})")


def resolve_keep_float(names: Sequence[str], layers: list[_Layer]) -> set[str]:
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


def _layers_of(model: nn.Module, graph: fx.GraphModule, rewrites: RewriteReport) -> list[_Layer]:
    called = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    layers = []
    for name in quantizable_layers(model):
        graph_name = rewrites.subpixel_layers.get(name, name)
        if name in rewrites.subpixel_layers or name in called:
            layers.append(_Layer(name, graph_name, type(model.get_submodule(name)).__name__))
    return layers


def write_torchscript(script_path: Path, out_path: Path, metadata: Mapping[str, Any]) -> None:
    """Rewrite a saved TorchScript archive compactly, with ``tbopt.json`` embedded.

    * The ``*.debug_pkl`` records are dropped: they only map graph nodes back to Python
      source lines for error messages, and were a quarter of the file.
    * Every record is DEFLATE-compressed (``torch.jit.save`` compresses only code and
      pickles); ``torch.jit.load`` inflates them as it reads, so the file on disk is about
      as small as its zipped size.
    * The records live under a short folder name; every record repeats it twice.
    """
    def put(dst: zipfile.ZipFile, record: str, data: bytes | str) -> None:
        info = zipfile.ZipInfo(f"{ARCHIVE_FOLDER}/{record}", date_time=_ZIP_TIME)
        dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)

    with zipfile.ZipFile(script_path) as src, zipfile.ZipFile(out_path, "w") as dst:
        for info in src.infolist():
            record = info.filename.split("/", 1)[1]
            if record.endswith(".debug_pkl") or record == f"extra/{TORCHSCRIPT_META}":
                continue
            put(dst, record, src.read(info))
        put(dst, f"extra/{TORCHSCRIPT_META}", json.dumps(metadata, separators=(",", ":")))


def quantize_model(source: Path | str, output: Path | str, config: QuantizeConfig | None = None, *,
                   force: bool = False, progress: Progress | None = None, command: str = "",
                   arch: str | None = None, arch_kwargs: str | Mapping[str, Any] | None = None,
                   trust_pickle: bool = False) -> QuantizeResult:
    """Quantize the float model in ``source`` to an int8 TorchScript file at ``output``."""
    cfg = config or QuantizeConfig()
    progress = progress or SilentProgress()
    source, output = Path(source), Path(output)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []

    check_output(output, force, inputs=(source,))
    loaded = load_model(source, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    refuse_unquantizable(loaded)
    model = loaded.module.eval()
    prep: Preprocessing = loaded.preprocessing

    t0 = time.perf_counter()
    calib_set, skipped = calibration_images(cfg.calib, cfg.calib_count, prep.size, progress)
    calib = torch.from_numpy(uint8_to_model(calib_set.inputs))
    timings["calibration_images_s"] = time.perf_counter() - t0

    try:
        graph, rewrites = optimize_graph(model, calib[:2], images=calib[:EQUALIZE_IMAGES])
    except TraceError as exc:
        raise UnsupportedError(f"the network cannot be traced into a static graph for quantization ({exc})",
                               hint="FX graph-mode quantization needs a forward() without data-dependent "
                                    "control flow") from None
    if rewrites.skipped:
        notes.append(rewrites.skipped)
    layers = _layers_of(model, graph, rewrites)
    if not layers:
        raise UnsupportedError("the network has no convolution or linear layer to quantize")
    forced = resolve_keep_float(cfg.keep_float, layers) if isinstance(cfg.keep_float, tuple) else set()
    if len(forced) == len(layers):
        raise ConfigError("--keep-float keeps every layer in float: there is nothing left to quantize")

    sens_x = calib[:cfg.sensitivity_images]
    with torch.no_grad():
        sens_ref = made_up(sens_x.numpy(), graph(sens_x).float().numpy(), prep.output)
    quantizer = _Quantizer(graph, layers, calib[:1], prep.output)
    threads = cfg.effective_threads

    t0 = time.perf_counter()
    backends, trials = usable_backends(cfg.backend, progress)
    rank_threads = RANKING_THREADS
    plan, reason, more_notes, float_ms = _choose_backend(
        quantizer, backends, trials, cfg, forced, calib, sens_x, sens_ref, model, rank_threads, progress, timings)
    notes.extend(more_notes)
    if float_ms is not None and plan.latency_ms >= float_ms:
        notes.append(f"the chosen {plan.backend} int8 model ({plan.latency_ms:.1f} ms) was not faster than the "
                     f"float model ({float_ms:.1f} ms) when the engines were ranked")
    for t in trials:
        if t.backend == plan.backend:
            t.status = "chosen"
    timings["backend_selection_s"] = time.perf_counter() - t0 - timings.get("calibration_s", 0.0) - timings.get("keep_float_s", 0.0)

    # ---- write, reload, measure ---------------------------------------------------------------
    t0 = time.perf_counter()
    params, nonzero = count_parameters(model)
    with quantized_engine(plan.backend):
        with atomic_output(output, force=force) as tmp:
            plain = tmp.parent / "plain.pt"
            torch.jit.save(plan.script, str(plain))
            stripped = tmp.parent / "stripped.pt"
            write_torchscript(plain, stripped, {})
            with _quiet():
                reloaded = torch.jit.load(str(stripped), map_location="cpu").eval()
            test = builtin_test_set(prep.size, cfg.eval_limit)
            float_runner = TorchRunner(model, prep, loaded=loaded)
            int8_runner = TorchRunner(reloaded, prep, kind="int8", engine=engine_label(plan.backend))
            before = evaluate(float_runner, test, progress=progress, description="scoring float model")
            after = evaluate(int8_runner, test, reference=before.outputs, progress=progress,
                             description="scoring int8 model")
            x1 = uint8_to_model(test.inputs[:1])
            with progress.task("timing float vs int8", total=None):
                lat = measure_latencies({"float": lambda: float_runner.predict(x1),
                                         "int8": lambda: int8_runner.predict(x1)},
                                        runs=cfg.runs, warmup=cfg.warmup, threads=threads)
            timings["evaluation_s"] = time.perf_counter() - t0
            decisions = plan.decisions
            quality = {
                "images": test.source,
                "float_target_psnr_db": _r(before.target_psnr_db), "int8_target_psnr_db": _r(after.target_psnr_db),
                "target_psnr_drop_db": _r(before.target_psnr_db - after.target_psnr_db),
                "fidelity_psnr_db": _r(after.fidelity_psnr_db), "worst_fidelity_db": _r(after.worst_fidelity_db),
                "calibration_fidelity_db": _r(plan.fidelity_db),
            }
            latency = {
                "float": lat["float"].to_dict(), "int8": lat["int8"].to_dict(),
                "float_engine": float_runner.engine, "int8_engine": int8_runner.engine,
                "ratio": _r(lat["int8"].p50_ms / lat["float"].p50_ms),
                "threads": lat["int8"].threads, "batch": 1, "size": prep.size,
            }
            calibration = {"source": calib_set.source, "images": len(calib_set), "skipped": skipped,
                           "batch": CALIB_BATCH, "sensitivity_images": len(sens_x),
                           "observers": "HistogramObserver activations (per tensor), weights per the backend's "
                                        "default (per channel except qnnpack)"}
            figures = {
                "backend": plan.backend, "quantized_layers": len(plan.quantize),
                "float_layers": [d.name for d in decisions if not d.quantized],
                "fidelity_psnr_db": quality["fidelity_psnr_db"],
                "float_target_psnr_db": quality["float_target_psnr_db"],
                "int8_target_psnr_db": quality["int8_target_psnr_db"],
                "float_latency_ms": _r(lat["float"].p50_ms), "int8_latency_ms": _r(lat["int8"].p50_ms),
                "threads": threads,
            }
            step = HistoryStep.now("quantize", command, cfg.to_dict(), figures)
            meta = {
                "format": TORCHSCRIPT_FORMAT, "format_version": TORCHSCRIPT_FORMAT_VERSION, "tbopt_version": __version__,
                "kind_description": f"an int8 TorchScript model ({plan.backend})",
                "quantized": True, "engine": engine_label(plan.backend), "quantized_engine": plan.backend,
                "preprocessing": prep.to_dict(),
                "history": [h.to_dict() for h in loaded.history] + [step.to_dict()],
                "architecture": loaded.artifact.arch.describe() + ", int8",
                "arch": loaded.artifact.arch.to_dict(),
                "parameters": params, "nonzero_parameters": nonzero,
                "macs": count_macs(graph, prep.size), "float_macs": count_macs(model, prep.size),
                "stored_weights": sum(p.numel() for p in graph.parameters()),
                "configuration": cfg.to_dict(),
                "calibration": calibration,
                "layers": [d.to_dict() for d in decisions],
                "rewrites": rewrites.to_dict(),
                "source": {"path": str(source), "sha256": loaded.sha256, "found": loaded.found},
                "requires": {"torch": torch.__version__.split("+")[0],
                             "load": f"torch.backends.quantized.engine = '{plan.backend}' before torch.jit.load",
                             "input": f"float32 (N, 3, {prep.size}, {prep.size}) in [-1, 1]; " + (
                                 "returns the residual r; the image is clamp(x + r, -1, 1)"
                                 if prep.output == "residual" else "returns the made-up image")},
                "measured_on": {"cpu": platform.processor() or platform.machine(),
                                "vnni": bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())},
            }
            write_torchscript(plain, tmp, meta)
    size = {
        "float_bytes": size_on_disk(source), "float_zipped_bytes": zipped_size(source),
        "int8_bytes": size_on_disk(output), "int8_zipped_bytes": zipped_size(output),
    }
    size["ratio"] = _r(size["int8_bytes"] / size["float_bytes"])
    size["zipped_ratio"] = _r(size["int8_zipped_bytes"] / size["float_zipped_bytes"])
    timings["total_s"] = time.perf_counter() - t_start
    if after.fidelity_psnr_db is not None and after.fidelity_psnr_db < cfg.min_psnr_db:
        notes.append(f"fidelity on the test set ({after.fidelity_psnr_db:.2f} dB) is below --min-psnr "
                     f"{cfg.min_psnr_db:g} dB although the calibration images reached {plan.fidelity_db:.2f} dB; "
                     f"calibrate on images closer to the test set (--calib)")
    if lat["int8"].p50_ms >= lat["float"].p50_ms:
        notes.append("the int8 model measured no faster than the float model in this run; the machine may be "
                     "loaded (check uptime and re-run tbopt bench)")
    return QuantizeResult(str(source), str(output), cfg, plan.backend, reason, engine_label(plan.backend), trials,
                          rewrites, calibration, decisions, plan.steps, size, quality, latency, timings, notes,
                          {"threads": rank_threads, "runs": SELECTION_RUNS, "float_ms": _r(float_ms),
                           "measure": "fastest of the runs, engines interleaved with each other and the float model"})


def _trial(plan: _Plan, all_int8_ms: float | None, min_psnr_db: float) -> BackendTrial:
    kept = [d.name for d in plan.decisions if not d.quantized]
    status = "meets target" if plan.fidelity_db >= min_psnr_db else "misses target"
    return BackendTrial(plan.backend, status, "", all_int8_ms, plan.latency_ms, plan.fidelity_db, kept)


def _keep_float_text(cfg: QuantizeConfig) -> str:
    return cfg.keep_float if isinstance(cfg.keep_float, str) else ",".join(cfg.keep_float)
