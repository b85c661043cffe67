"""tbopt optimize: the smallest Core ML file per iOS target and the fastest int8 CPU file that keep the
quality, found by a search over what tbopt can do, with the commands that rebuild each."""

from __future__ import annotations

import time

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer

from ..core.errors import UsageError
from ..flow.optimize_config import (
    DEFAULT_TARGETS,
    DEFAULT_TIME_BUDGET_MIN,
    PALETTES,
    REPORT_FILES,
    TARGET_FILES,
    OptimizeConfig,
)
from . import _imports, _output
from ._errors import handle_errors
from ._options import (
    ArchKwargsOpt,
    ArchOpt,
    DEFAULT_RUNS,
    DataOpt,
    ForceOpt,
    JsonOpt,
    LimitOpt,
    QuietOpt,
    RunsOpt,
    ThreadsOpt,
    TrustPickleOpt,
    pick,
    split_list,
)

if TYPE_CHECKING:
    from ..flow.optimize import OptimizeResult

SPACE = "Search space"


def _csv(values: tuple) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


class Target(str, Enum):
    ios13 = "ios13"
    ios16 = "ios16"
    ios17 = "ios17"
    ios18 = "ios18"
    cpu = "cpu"


def _numbers(values: list[str] | None, default: tuple, what: str, kind: type = float) -> tuple:
    """A list option's numbers (repeatable, or comma lists; '' alone for none); ``default`` when not given."""
    if values is None:
        return default
    try:
        return tuple(kind(v) for v in split_list(values))
    except ValueError:
        raise UsageError(f"{what} takes {'whole ' if kind is int else ''}numbers, got {' '.join(values)!r}") from None


@handle_errors
def optimize(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="Float checkpoint or tbopt artifact to optimize. Default: the bundled demo checkpoint.",
        show_default=False)] = None,
    max_drop: Annotated[float, typer.Option(
        "--max-drop", help="Quality budget where the images have targets: PSNR may drop at most this many dB "
                           "below the original's.")] = 0.3,
    min_fidelity: Annotated[float, typer.Option(
        "--min-fidelity", help="Quality budget where the images have no targets: PSNR of the made-up images "
                               "against the original model's, at least (dB).")] = 40.0,
    targets: Annotated[Optional[List[str]], typer.Option(
        "--for", metavar="TARGET",
        help=f"Where the model will run (repeatable, or a comma list): ios13 ({TARGET_FILES['ios13']}), ios16/ios17/ios18 "
                      f"(.mlpackage), cpu (int8 TorchScript). Default: {', '.join(DEFAULT_TARGETS)}.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="DIR", show_default="optimized_model",
        help="Folder for the chosen files, search.json, search.md, pareto.png and the search cache (made if "
             "missing).")] = None,
    out_old: Annotated[Optional[Path], typer.Option("--out", hidden=True, help="Old name of --output.")] = None,
    data: DataOpt = None,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="Folder of unlabeled images for channel ranking, distillation and int8 calibration. "
                        "Default: synthetic portraits, never the test set.", rich_help_panel="Data")] = None,
    limit: LimitOpt = None,
    time_budget: Annotated[float, typer.Option(
        "--time-budget", min=0, help="Minutes from the command's start: no step starts that is expected to end "
                                     "after this, one still running then is stopped; the result lists what was "
                                     "not tried. 0: no limit.")
    ] = DEFAULT_TIME_BUDGET_MIN,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the search in --output: finished candidates are read from its cache, not redone.")
    ] = False,
    rates: Annotated[Optional[List[str]], typer.Option(
        "--rates", help="Channel-pruning rates to try after the unpruned model (repeatable, or a comma list). "
                        f"Default: {_csv(OptimizeConfig.rates)}.", rich_help_panel=SPACE, show_default=False)] = None,
    finetune_steps: Annotated[Optional[List[str]], typer.Option(
        "--finetune-steps", help="Distillation lengths to try after channel pruning (repeatable, or a comma "
                                 "list); a longer one continues the shortest (tbopt prune --continue-from), for "
                                 "the rates it kept and the first it missed. Default: tbopt prune's, then 2000.",
        rich_help_panel=SPACE, show_default=False)] = None,
    full_res_rates: Annotated[Optional[List[str]], typer.Option(
        "--full-res-rates", help="For each rate the longest distillation kept: the same rate with the channel groups "
                                 "of the full-resolution convs pruned at these rates (tbopt prune --group-rate; "
                                 f"repeatable, or a comma list; '' for none). Default: {_csv(OptimizeConfig.full_res_rates)}.",
        rich_help_panel=SPACE, show_default=False)] = None,
    palettes: Annotated[Optional[List[str]], typer.Option(
        "--palettes", help="Palette sizes to try, largest first (repeatable, or a comma list). "
                           f"Default: {_csv(PALETTES)}.", rich_help_panel=SPACE, show_default=False)] = None,
    sparsities: Annotated[Optional[List[str]], typer.Option(
        "--sparsities", help="Shares of weights to zero and store sparse in .mlpackage files (repeatable, or a "
                             f"comma list; '' for none). Default: {_csv(OptimizeConfig.sparsities)}.",
        rich_help_panel=SPACE, show_default=False)] = None,
    fit_steps: Annotated[int, typer.Option(
        "--fit-steps", min=0, help="Steps of palette fitting (tbopt export --fit-palettes) for the palettes that "
                                   "missed the budget; 0 to skip.", rich_help_panel=SPACE)] = OptimizeConfig.fit_steps,
    lower_rates: Annotated[Optional[List[str]], typer.Option(
        "--lower-rates", help="Rates below the first of --rates, tried (highest first) when the first misses the "
                              "budget after the short distillation (repeatable, or a comma list; '' for none). "
                              f"Default: {_csv(OptimizeConfig.lower_rates)}.",
        rich_help_panel=SPACE, show_default=False)] = None,
    gptq: Annotated[bool, typer.Option(
        "--gptq/--no-gptq", help="Try the palettes plain k-means missed again with GPTQ entries (tbopt export "
                                 "--palette-method gptq: same bytes).", rich_help_panel=SPACE)] = True,
    bits_by_layer: Annotated[bool, typer.Option(
        "--bits-by-layer/--no-bits-by-layer", help="Also try the palettes that missed the budget with bits chosen "
                                                   "by layer in the same bytes (tbopt export --bits-by-layer auto).",
        rich_help_panel=SPACE)] = True,
    recipe: Annotated[Optional[Path], typer.Option(
        "--recipe", metavar="FILE",
        help="The search.json of an earlier tbopt optimize (same architecture): rebuild its chosen recipes on this "
             "checkpoint, score them against this budget, and search only the targets where one misses. Default "
             "--for: its targets.", rich_help_panel="Replay", show_default=False)] = None,
    from_dir: Annotated[Optional[Path], typer.Option(
        "--from", metavar="DIR", help="The --output folder of an earlier tbopt optimize: --recipe DIR/search.json.",
        rich_help_panel="Replay", show_default=False)] = None,
    runs: RunsOpt = DEFAULT_RUNS,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """Find the smallest Core ML file per iOS target and the fastest int8 CPU file within a quality budget.

    Searches channel pruning (rate 0 first), distillation length, Core ML weight storage and int8, cheap
    steps first, and writes the chosen files, search.json, search.md and pareto.png into --output.
    """
    started = time.perf_counter()  # the time budget counts from here: the imports are part of the wait
    _imports.everything()
    from ..flow.optimize import optimize as run_search  # noqa: PLC0415 - torch and coremltools, only when run
    from ..flow.optimize_replay import read_replay, replay_source  # noqa: PLC0415

    ui = _output.Output(json_mode=json_out, quiet=quiet)
    if out is not None and out_old is not None and out != out_old:
        raise UsageError("--out is the old name of --output; give one of them")
    out = out or out_old or Path("optimized_model")
    source = replay_source(recipe, from_dir)
    chosen = pick(split_list(targets), [t.value for t in Target], "--for") if targets else DEFAULT_TARGETS
    if source is not None and not targets:
        chosen = tuple(read_replay(source).recipes) or DEFAULT_TARGETS  # the earlier search's targets
    cfg = OptimizeConfig(
        max_drop_db=max_drop, min_fidelity_db=min_fidelity,
        targets=chosen, data=data, limit=limit,
        calib=calib, time_budget_min=time_budget or None, rates=_numbers(rates, OptimizeConfig.rates, "--rates"),
        finetune_steps=_numbers(finetune_steps, OptimizeConfig.finetune_steps, "--finetune-steps", int),
        full_res_rates=_numbers(full_res_rates, OptimizeConfig.full_res_rates, "--full-res-rates"),
        palettes=split_list(palettes) if palettes is not None else PALETTES,
        sparsities=_numbers(sparsities, OptimizeConfig.sparsities, "--sparsities"), fit_steps=fit_steps, bits_by_layer=bits_by_layer, runs=runs,
        threads=threads, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle,
        lower_rates=_numbers(lower_rates, OptimizeConfig.lower_rates, "--lower-rates"), gptq=gptq)
    path = ui.model_or_demo(checkpoint)
    with ui.live_table(f"tbopt optimize: candidates ({path.name})", ROW_COLUMNS, right=ROW_COLUMNS[3:8]) as add:
        result = run_search(path, out, cfg, force=force, resume=resume, progress=ui,
                            on_row=lambda row: add(row_cells(row)), recipe=source, started=started)
    ui.emit(result, render_optimize)


ROW_COLUMNS = ["target", "model", "storage", "size (B)", "zipped (B)", "quality (dB)", "fidelity (dB)",
               "latency (ms)", "within budget", "seconds"]


def row_cells(row: Any) -> list[Any]:
    """A candidate (or a float model made on the way) as a row of the live table."""
    if hasattr(row, "recipe"):
        r = row.recipe
        return [r.target, r.model_key, r.storage, row.size_bytes, row.zipped_bytes, row.quality_db,
                row.fidelity_psnr_db, row.latency_ms, row.kept, f"{row.seconds:.1f}" + (" (cached)" if row.cached else "")]
    return ["float", row.key, "-", None, None, row.quality_db, row.fidelity_psnr_db, None, row.kept,
            f"{row.seconds:.1f}" + (" (cached)" if row.cached else "")]


def render_optimize(ui: _output.Output, r: OptimizeResult) -> None:
    d = r.to_dict()
    o = d["original"]
    rows = [("original", o["file"], o["size_bytes"], o["zipped_bytes"], o["quality_db"], "ref", o["latency_ms"],
             "-")]
    for target, c in d["chosen"].items():
        if c.get("file") is None:
            rows.append((target, c["reason"], None, None, None, None, None, "-"))
            continue
        rows.append((target, Path(c["file"]).name, c["size_bytes"], c["zipped_bytes"], c["quality_db"],
                     c["fidelity_psnr_db"], c.get("latency_ms"), c["recipe"]["key"]))
    heads = ["target", "file", "size (B)", "zipped (B)", f"{d['quality_axis']} (dB)", "fidelity (dB)",
             "latency (ms)", "recipe"]
    ui.table(f"tbopt optimize: {Path(r.checkpoint).name} -> {r.out}/", heads, rows, caption=d["caption"],
             right=heads[2:7])
    ui.line(f"budget: {d['budget']['description']}")
    for target, c in d["chosen"].items():
        if c.get("commands"):
            ui.line(f"rebuild {Path(c['file']).name}:")
            for line in c["commands"]:
                ui.line(f"  {line}")
    tried = len(r.candidates)
    ui.line(f"{tried} candidate(s) and {len(r.models)} float model(s) in {r.seconds:.0f} s; "
            f"{len(r.skipped)} skipped (their branch missed, or they could not beat a kept file), "
            f"{len(r.not_tried)} not tried (time budget); wrote {', '.join(REPORT_FILES.values())} into {r.out}/")
    if r.replay:
        from ..measure.search_report import replay_text  # noqa: PLC0415

        ui.line(f"replayed from {r.replay['from']}:")
        for target, t in r.replay["targets"].items():
            ui.line(f"  {target}: {replay_text(t)}")
    if r.stopped:
        ui.line(f"stopped: {r.stopped}")
    cpu = d["chosen"].get("cpu") or {}
    if cpu.get("latency_note"):
        ui.line(f"cpu latency: {cpu['latency_note']}")
    for n in r.notes:
        ui.note(n)

