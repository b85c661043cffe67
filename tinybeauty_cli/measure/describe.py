"""What a model file is: architecture, parameters, MACs, sizes, preprocessing, history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.checkpoint import LoadedModel
from ..core.counts import count_macs, count_parameters
from ..core.files import sha256_file, size_on_disk, zipped_size, zipped_size_of_bytes
from ..core.runner import Runner
from ..core.written import WrittenFile
from ..runtime.runners import TorchRunner, open_runner


def model_figures(loaded: LoadedModel) -> dict[str, Any]:
    """Architecture, parameter and MAC counts of a loaded PyTorch model."""
    if loaded.kind == "float":
        module = loaded.module
        params, nonzero = count_parameters(module)
        return {
            "architecture": loaded.artifact.arch.describe(),
            "arch": loaded.artifact.arch.to_dict(),
            "parameters": params,
            "nonzero_parameters": nonzero,
            "macs": count_macs(module, loaded.preprocessing.size),
        }
    meta = loaded.metadata
    figures = {k: meta[k] for k in ("architecture", "arch", "parameters", "nonzero_parameters", "macs") if k in meta}
    figures.setdefault("architecture", "TorchScript module")
    return figures


def describe(path: Path | str, runner: Runner | None = None, written: WrittenFile | None = None,
             **options: Any) -> dict[str, Any]:
    """Everything ``tbopt info`` shows, as a dict (the same dict ``--json`` prints). ``written``: the
    file as the command wrote it (its sizes and hash are taken from it, not read again)."""
    path = Path(path)
    runner = runner or open_runner(path, check=False, **options)  # info describes a broken model, and says so
    loaded = runner.loaded if isinstance(runner, TorchRunner) else None
    info: dict[str, Any] = {"path": str(path), "kind": runner.kind, "engine": runner.engine}
    problems = loaded.problems if loaded is not None else list(getattr(runner, "problems", ()))
    if problems:
        info["problems"] = problems
    if written is not None and written.path == path:
        info.update(size_bytes=written.size_bytes, zipped_bytes=written.zipped_bytes, sha256=written.sha256)
    elif loaded is not None and loaded.content and Path(loaded.path) == path:
        # the file was read (and hashed) when it was opened: its bytes are not read again
        info.update(size_bytes=len(loaded.content), zipped_bytes=zipped_size_of_bytes(loaded.content, path.name),
                    sha256=loaded.sha256)
    else:
        info.update(size_bytes=size_on_disk(path), zipped_bytes=zipped_size(path),
                    sha256=loaded.sha256 if loaded is not None and Path(loaded.path) == path else sha256_file(path))
    if loaded is not None:
        info["found"] = loaded.found
        info.update(model_figures(loaded))
        info["preprocessing"] = loaded.preprocessing.to_dict()
        info["history"] = [h.to_dict() for h in loaded.history]
        if loaded.artifact is not None and loaded.artifact.source:
            info["source"] = loaded.artifact.source
        if loaded.metadata:
            info["metadata"] = {k: v for k, v in loaded.metadata.items() if k != "history"}
    info.update(runner.info())
    return info
