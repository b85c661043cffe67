"""``tbopt prune`` on files: load a float checkpoint, prune it in memory, score it, write the new artifact.

The pruning itself is :func:`..prune.transform.prune_module` (module in, module out). Here
are the parts that touch files and the evaluation images: the unlabeled image pool (a
folder, or synthetic portraits -- never the evaluation images), scoring the input, the
pruned-only and the final model, the new artifact (history extended by this step) and the
check that it rebuilds from its own record, and the sizes on disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..core.artifact import ArchSpec, Artifact, HistoryStep, Preprocessing, artifact_bytes, write_artifact
from ..core.checkpoint import LoadedModel, load_model
from ..core.contexts import torch_threads
from ..core.errors import ImageError, InputError, UnsupportedError, UsageError
from ..core.files import check_output, zipped_size_of_bytes
from ..core.images import ImageSet, builtin_test_set, load_folder, read_unlabeled, synthetic_unlabeled, uint8_to_model
from ..core.model import config_from_state_dict
from ..core.progress import Progress, SilentProgress
from ..core.sanity import require_finite_on
from ..core.written import WrittenFile
from ..measure.evaluate import Evaluation, evaluate
from ..prune.config import PruneConfig, PruneMethod
from ..prune.layers import excluded_layers, require_conv_layers
from ..prune.report import PruneReport
from ..prune.transform import prune_module
from ..runtime.runners import TorchRunner

#: ``scorer(module, reference, description, label)``: the module scored on the evaluation images, its
#: fidelity measured against ``reference`` (the input model's made-up images) when given; ``label``
#: names the module in messages (the input file, or "the pruned model of FILE").
Scorer = Callable[[nn.Module, Optional[np.ndarray], str, str], Evaluation]


def default_output_name(source: Path, cfg: PruneConfig) -> Path:
    """``<stem>_pruned-<method>-<percent>.pt`` in the current folder, e.g. ``tinybeauty_demo_pruned-channel-30.pt``."""
    percent = f"{cfg.rate * 100:g}".replace(".", "p")
    return Path(f"{source.stem}_pruned-{cfg.method}-{percent}.pt")


def unlabeled_images(data: Path | None, size: int, count: int, progress: Progress | None = None) -> ImageSet:
    """Distillation / calibration images: every readable image of a folder (pairs: inputs only; files
    that cannot be read are skipped, with a note), or ``count`` synthetic portraits."""
    if data is None:
        return synthetic_unlabeled(count, size, progress=progress)
    images, skipped, files = read_unlabeled(Path(data), size)
    if images is None:
        what = f"{files} image file(s), none readable" if files else "no image files"
        raise ImageError(f"fine-tuning folder {data} has no readable images ({what})",
                         hint="give a folder of face photos (png, jpg, ...) or leave it out to use synthetic "
                              "portraits")
    if skipped:
        (progress or SilentProgress()).note(
            f"fine-tuning images: skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:3])}"
            f"{' ...' if len(skipped) > 3 else ''}")
    return images


def torch_scorer(preprocessing: Preprocessing, images: ImageSet, progress: Progress | None = None) -> Scorer:
    """Score a float module with PyTorch on ``images`` (what ``prune_loaded`` does when given no scorer)."""
    def score(module: nn.Module, reference: np.ndarray | None, description: str, label: str) -> Evaluation:
        module.eval()
        runner = TorchRunner(module, preprocessing, loaded=None, name=label)
        return evaluate(runner, images, reference=reference, progress=progress, description=description)
    return score


def rebuild_check(artifact: Artifact, pruned: nn.Module, example: torch.Tensor) -> None:
    """The saved artifact must rebuild, from its architecture record and shapes alone, into ``pruned``."""
    rebuilt = artifact.build_model()
    with torch.inference_mode():
        a, b = rebuilt(example), pruned.eval()(example)
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        raise UnsupportedError(
            f"the pruned {artifact.arch.describe()} does not rebuild from its state dict "
            f"(max difference {float((a - b).abs().max()) if a.shape == b.shape else 'shape'})",
            hint="its constructor must be able to take the narrower layers; see README 'tbopt prune'")


def _arch_for(artifact: Artifact, model: nn.Module) -> ArchSpec:
    """TinyBeauty's record carries its widths, which channel pruning changed; a user's class rebuilds from shapes."""
    if artifact.arch.name == "tinybeauty":
        return ArchSpec.tinybeauty(config_from_state_dict(model.state_dict()))
    return artifact.arch


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 3)


def continued_steps(loaded: LoadedModel, cfg: PruneConfig, shorter: LoadedModel) -> int:
    """The distillation steps ``shorter`` already holds of ``cfg``'s pruning of ``loaded``
    (``tbopt prune --continue-from``): its last step must be that pruning, of this checkpoint, with the
    same settings and fewer steps; anything else is refused."""
    steps = shorter.artifact.history if shorter.artifact is not None else []
    last = steps[-1] if steps else None
    if last is None or last.step != "prune":
        raise InputError(f"--continue-from {shorter.path}: its last step is not a tbopt prune")
    if last.figures.get("source_sha256") != loaded.sha256:
        raise InputError(f"--continue-from {shorter.path} was not pruned from {loaded.path}")
    done = int(last.config.get("finetune_steps", 0))
    same = {**last.config, "finetune_steps": cfg.steps} == {**cfg.to_dict()}
    if not same:
        raise InputError(f"--continue-from {shorter.path} was pruned with other settings ({last.command})",
                         hint="give the same --method, --rate, --group-rate, --exclude and --seed")
    if not 0 < done < cfg.steps:
        raise UsageError(f"--continue-from {shorter.path} holds {done} distillation steps; "
                         f"--finetune-steps must be more than that, got {cfg.steps}")
    return done


def _ranking_images(loaded: LoadedModel, cfg: PruneConfig, data: Path | None, progress: Progress,
                    seconds: dict[str, float]) -> tuple[torch.Tensor | None, str | None]:
    """The images channels are ranked on and the pruned model is distilled on (None when neither is
    done), and where they came from; the seconds they took go into ``seconds["images"]``."""
    if not (cfg.any_pruning and (cfg.steps > 0 or cfg.method == PruneMethod.channel.value)):
        return None, None
    t_images = time.perf_counter()
    count = max(cfg.finetune_images, cfg.calibration_images) if cfg.steps > 0 else cfg.calibration_images
    images = unlabeled_images(data, loaded.preprocessing.size, count, progress)
    pool = torch.from_numpy(uint8_to_model(images.inputs))
    # channels are ranked on these images and the pruned model distilled from the original's outputs on
    # them: a NaN there would train NaN weights, and the message would blame the pruned model
    require_finite_on(loaded.path, loaded.module, pool, images.image_labels())
    seconds["images"] = round(time.perf_counter() - t_images, 2)  # drawn or read: part of the recovery
    return pool, images.source


def prune_loaded(loaded: LoadedModel, cfg: PruneConfig, *, data: Path | None = None,
                 eval_images: ImageSet | None = None, progress: Progress | None = None,
                 scorer: Scorer | None = None, continue_from: LoadedModel | None = None,
                 score_before_finetune: bool = True) -> tuple[Artifact, nn.Module, PruneReport]:
    """Prune a loaded float model, fine-tune it, score it; nothing is written. ``data``: unlabeled images
    for ranking and distillation (default: synthetic portraits); ``scorer`` scores every model (default:
    :func:`torch_scorer` on ``eval_images``, the built-in test set when not given); ``continue_from``: the
    same pruning distilled for fewer steps, continued (:func:`continued_steps`); without
    ``score_before_finetune`` the pruned model is scored only after its distillation.
    Returns the new artifact (history extended), the pruned module and the report (sizes not filled in).
    """
    progress = progress or SilentProgress()
    t_start = time.perf_counter()
    if loaded.kind != "float" or loaded.artifact is None:
        raise UnsupportedError(f"{loaded.path} is a {loaded.kind} model; prune needs a float checkpoint "
                               f"(prune before quantizing or exporting)")
    original = loaded.module.eval()
    excluded_layers(require_conv_layers(original), cfg.exclude)  # refuse a bad --exclude before any work
    size = loaded.preprocessing.size
    eval_images = eval_images or builtin_test_set(size, progress=progress)
    if eval_images.inputs.shape[1] != size:
        raise InputError(f"evaluation images are {eval_images.inputs.shape[1]}px but the model takes {size}px")

    seconds: dict[str, float] = {}
    pool, pool_source = _ranking_images(loaded, cfg, data, progress, seconds)

    score = scorer or torch_scorer(loaded.preprocessing, eval_images, progress)

    def timed_score(module: nn.Module, reference: np.ndarray | None, description: str, label: str) -> Evaluation:
        t0 = time.perf_counter()
        try:
            return score(module, reference, description, label)
        finally:
            seconds["evaluate"] = round(seconds.get("evaluate", 0.0) + time.perf_counter() - t0, 2)

    pruned_label = f"the pruned model of {loaded.path}"
    base = timed_score(original, None, "scoring the input model", str(loaded.path))
    reference = base.outputs
    quality: dict[str, Any] = {"images": eval_images.source, "target_psnr_before_db": _r(base.target_psnr_db)}

    def score_pruned_only(model: nn.Module) -> None:
        raw = timed_score(model, reference, "scoring before fine-tuning", f"{pruned_label} (before fine-tuning)")
        quality["target_psnr_pruned_only_db"] = _r(raw.target_psnr_db)
        quality["fidelity_pruned_only_db"] = _r(raw.fidelity_psnr_db)

    start = None
    if continue_from is not None:
        start = (continue_from.module.eval(), continued_steps(loaded, cfg, continue_from))
    model, report = prune_module(original, cfg, pool, size=size,
                                 before_finetune=score_pruned_only if score_before_finetune else None,
                                 progress=progress, continue_from=start)
    final = timed_score(model, reference, "scoring the pruned model", pruned_label)
    quality.update({
        "target_psnr_after_db": _r(final.target_psnr_db),
        "do_nothing_psnr_db": _r(final.do_nothing_psnr_db),
        "fidelity_psnr_db": _r(final.fidelity_psnr_db),
        "worst_fidelity_db": _r(final.worst_fidelity_db),
    })
    if base.target_psnr_db is not None and final.target_psnr_db is not None:
        quality["target_psnr_change_db"] = _r(final.target_psnr_db - base.target_psnr_db)
    report.input = str(loaded.path)
    report.quality = quality
    report.seconds = {**seconds, **report.seconds}  # the input was scored before pruning began
    if report.finetune["steps"]:
        report.finetune["images"] = pool_source

    command = cfg.command_line() + (f" --continue-from {continue_from.path}" if continue_from is not None else "")
    step = HistoryStep.now("prune", command, cfg.to_dict(), {**report.figures(), "source_sha256": loaded.sha256})
    artifact = loaded.artifact.with_step(model, step, arch=_arch_for(loaded.artifact, model))
    rebuild_check(artifact, model, torch.from_numpy(uint8_to_model(eval_images.inputs[:1])))
    report.architecture = artifact.arch.describe()
    report.seconds["total"] = round(time.perf_counter() - t_start, 2)
    return artifact, model, report


def prune_file(path: Path | str, cfg: PruneConfig, *, output: Path | str | None = None, force: bool = False,
               data: Path | None = None, eval_data: Path | None = None, eval_limit: int | None = None,
               arch: str | None = None, arch_kwargs: str | Mapping[str, Any] | None = None,
               trust_pickle: bool = False, threads: int | None = None,
               progress: Progress | None = None, continue_from: Path | str | None = None) -> PruneReport:
    """``tbopt prune``: load, prune, fine-tune, score, write a tbopt artifact, measure it.

    ``threads`` sets PyTorch's CPU threads for the whole step (restored afterwards).
    """
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    with torch_threads(threads):
        return _prune_file(Path(path), cfg, output, force, data, eval_data, eval_limit,
                           dict(arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle), progress,
                           Path(continue_from) if continue_from is not None else None)


def _prune_file(path: Path, cfg: PruneConfig, output: Path | str | None, force: bool, data: Path | None,
                eval_data: Path | None, eval_limit: int | None, model_options: dict[str, Any],
                progress: Progress | None, continue_from: Path | None = None) -> PruneReport:
    out_path = Path(output) if output is not None else default_output_name(path, cfg)
    out_path = check_output(out_path, force, inputs=(path,) + ((continue_from,) if continue_from else ()))
    if eval_limit is not None and eval_limit < 1:
        raise UsageError(f"--limit must be >= 1, got {eval_limit}")
    loaded = load_model(path, **model_options)
    size = loaded.preprocessing.size
    eval_images = (builtin_test_set(size, eval_limit, progress) if eval_data is None
                   else load_folder(Path(eval_data), size, eval_limit))
    shorter = load_model(continue_from) if continue_from is not None else None
    artifact, _model, report = prune_loaded(loaded, cfg, data=data, eval_images=eval_images, progress=progress,
                                            continue_from=shorter)
    write_pruned(artifact, loaded, report, out_path, force=force)
    return report


def write_pruned(artifact: Artifact, source: LoadedModel, report: PruneReport, out_path: Path, *,
                 force: bool = False) -> WrittenFile:
    """Write the pruned ``artifact`` atomically, fill the report's sizes and return the file as
    written (later stages take its bytes and never open it). The input's sizes are those of its
    artifact in the same format, made in memory: a checkpoint of another layout would not compare."""
    t0 = time.perf_counter()
    written = write_artifact(artifact, out_path, force=force)
    base = artifact_bytes(source.artifact)
    report.before.size_bytes, report.before.zipped_bytes = len(base), zipped_size_of_bytes(base, out_path.name)
    report.after.size_bytes, report.after.zipped_bytes = written.size_bytes, written.zipped_bytes
    report.output = str(out_path)
    report.seconds["write"] = round(time.perf_counter() - t0, 2)
    report.seconds["total"] = round(report.seconds["total"] + report.seconds["write"], 2)
    return written
