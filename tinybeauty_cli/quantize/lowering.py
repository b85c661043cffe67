"""Lowering an int8 FX graph to TorchScript, and the archive format tbopt writes it in.

The lowered model is scripted (traced if scripting fails) and frozen, so the quantized
weights become packed constants. :func:`torchscript_archive` rewrites a saved archive
compactly and reproducibly (fixed record times) with ``tbopt.json`` metadata embedded, in
memory; the file ``flow/`` writes from it loads with ``torch.jit.load`` alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from typing import Any, Iterator, Mapping

import torch
from torch import fx, nn

from ..core.checkpoint import TORCHSCRIPT_META
from .config import _ZIP_TIME, ARCHIVE_FOLDER
from .fx_passes import pad_input_before_channels_last


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's warnings for a block.

    It and quantized tensors warn that they are deprecated in favour of torchao; the user
    can do nothing about it, and the accuracy warnings are read separately.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def engine_label(backend: str) -> str:
    """How an int8 TorchScript model made for ``backend`` is computed, as reports name it."""
    return f"PyTorch int8 {backend} (TorchScript)"


class _ChannelsLast(nn.Module):
    """Channels-last inside (what the int8 kernels use), plain NCHW at the boundary.

    When the network's first step is padding its input, the input is padded first and converted
    after (:func:`~.fx_passes.pad_input_before_channels_last`): ATen pads a 3-channel image about
    seven times faster laid out NCHW (9 against 71 us at 256 x 256, 2 threads), a fixed cost that
    pruning does not shrink.
    """

    def __init__(self, net: nn.Module, converts_input: bool = False):
        super().__init__()
        self.net = net
        self.converts_input = converts_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.converts_input:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).contiguous()


def lower_to_torchscript(converted: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Script (trace if scripting fails) and freeze; quantized weights become packed constants.

    Call it with ``torch.backends.quantized.engine`` borrowed for the backend the model was
    converted for: freezing packs the weights for the current engine.
    """
    converts_input = isinstance(converted, fx.GraphModule) and pad_input_before_channels_last(converted)
    wrapped = _ChannelsLast(converted, converts_input).eval()
    with quiet(), torch.no_grad():
        try:
            scripted = torch.jit.script(wrapped)
        except Exception:  # noqa: BLE001 - a user's network may use Python that only tracing understands
            scripted = torch.jit.trace(wrapped, example, check_trace=False)
        frozen = torch.jit.freeze(scripted.eval())
        # freeze folds constants and merges common subexpressions in an order that follows the
        # process's hash seed, and may stop short of either; doing both again until nothing changes
        # gives one graph, so the same model is saved as the same bytes in every run.
        graph = frozen.graph
        for _ in range(8):
            before = str(graph)
            torch._C._jit_pass_constant_propagation(graph)
            torch._C._jit_pass_cse(graph)
            torch._C._jit_pass_dce(graph)
            if str(graph) == before:
                break
        return frozen


def torchscript_bytes(script: torch.jit.ScriptModule) -> bytes:
    """``torch.jit.save`` of ``script``, in memory (its own file writer aborts the process on a full disk)."""
    buffer = io.BytesIO()
    torch.jit.save(script, buffer)
    return buffer.getvalue()


def torchscript_archive(saved: bytes, metadata: Mapping[str, Any]) -> bytes:
    """A saved TorchScript archive (``saved``, as :func:`torchscript_bytes` makes it) rewritten
    compactly, with ``tbopt.json`` embedded.

    * The ``*.debug_pkl`` records are dropped: they only map graph nodes back to Python
      source lines for error messages, and were a quarter of the file.
    * Every record is DEFLATE-compressed (``torch.jit.save`` compresses only code and
      pickles); ``torch.jit.load`` inflates them as it reads, so the file on disk is about
      as small as its zipped size.
    * The records live under a short folder name; every record repeats it twice.
    * Every record has the same fixed time, so that the same model gives the same bytes.
    """
    def put(dst: zipfile.ZipFile, record: str, data: bytes | str) -> None:
        info = zipfile.ZipInfo(f"{ARCHIVE_FOLDER}/{record}", date_time=_ZIP_TIME)
        dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            record = info.filename.split("/", 1)[1]
            if record.endswith(".debug_pkl") or record == f"extra/{TORCHSCRIPT_META}":
                continue
            put(dst, record, src.read(info))
        put(dst, f"extra/{TORCHSCRIPT_META}", json.dumps(metadata, separators=(",", ":")))
    return out.getvalue()
