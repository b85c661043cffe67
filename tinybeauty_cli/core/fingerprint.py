"""A fingerprint of a model's weights: the key of every memo of what a model computes.

A memo keyed by the model object (``id(module)``) goes stale when the weights change in place
(distillation, palette fitting, a refit): the fingerprint is a hash of the bytes of every tensor
the module holds, so any edit gives another key. An 85K-parameter model hashes in milliseconds.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch
from torch import nn


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.is_quantized:
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                h.update(f"{t.q_scale()},{t.q_zero_point()}".encode())
            else:
                _feed(h, t.q_per_channel_scales())
                _feed(h, t.q_per_channel_zero_points())
            t = t.int_repr()
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, dict):
        for k in value:
            h.update(str(k).encode())
            _feed(h, value[k])
    else:
        h.update(repr(value).encode())


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of ``module``'s structure and weights: it changes whenever a weight does.

    A TorchScript module (an int8 file's, whose packed weights are not in its ``state_dict``) is
    hashed as ``torch.jit.save`` writes it; any other module by its layers (``repr``: pruned
    widths) and every tensor of its ``state_dict``.
    """
    h = hashlib.sha256()
    if isinstance(module, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        h.update(b"torchscript\0")
        h.update(buffer.getvalue())
        return h.hexdigest()
    h.update(type(module).__qualname__.encode())
    h.update(repr(module).encode())
    for name, value in module.state_dict(keep_vars=False).items():
        h.update(name.encode() + b"\0")
        _feed(h, value)
    return h.hexdigest()
