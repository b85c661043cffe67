"""Global PyTorch state borrowed for a block and restored after: CPU threads, the int8 engine.

In core because loading an int8 checkpoint borrows the engine too, and core imports nothing above it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's CPU threads set to ``threads`` (None: unchanged) inside the block, restored after."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Run a block with ``torch.backends.quantized.engine`` set to ``name`` (weights are packed for it)."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old
