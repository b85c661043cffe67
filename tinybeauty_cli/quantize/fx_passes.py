"""FX passes around int8 conversion: before it, keep the inputs of cat / stack in float
(:func:`isolate_list_inputs`); after it, clean up the converted graph before it is lowered to
TorchScript (each removes work or archive records without changing what the model computes).
Also the small modules these passes and the float rewrites put into graphs.
(No ``from __future__ import annotations`` here: TorchScript reads :class:`FloatBoundary`.)
"""

import torch
from torch import fx, nn

_PADS = (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d)
_LIST_OPS = (torch.cat, torch.concat, torch.concatenate, torch.stack)


class FloatBoundary(nn.Module):
    """Identity that quantization leaves in float: its input is dequantized before it.

    torch 2.13's FX ``convert_fx`` passes the int8 outputs of two convolutions straight to a
    ``torch.cat`` that is meant to stay float, and ``torch.cat`` of quantized tensors with
    different scales silently mixes them up. A boundary on each input keeps the cat float.
    Freezing the TorchScript model removes the call.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SigmoidTanh(nn.Module):
    """``tanh(x)`` computed as ``2 * sigmoid(2x) - 1``.

    The same function (within 2e-7, float rounding), but ATen's CPU ``sigmoid`` is vectorised and
    its ``tanh`` is not as fast: on the 3 x 256 x 256 output at 2 threads (AMD EPYC, AVX-512), 45 us
    instead of 205 us, a fixed cost that channel pruning does not shrink.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x * 2.0).mul_(2.0).sub_(1.0)  # in place: one buffer, not three


def isolate_list_inputs(gm: fx.GraphModule) -> int:
    """Put a :class:`FloatBoundary` on every tensor input of cat / stack; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LIST_OPS or not node.args:
            continue
        tensors = node.args[0]
        if not isinstance(tensors, (list, tuple)):
            continue
        wrapped = []
        for t in tensors:
            if isinstance(t, fx.Node):
                name = f"float_boundary_{count}"
                gm.add_submodule(name, FloatBoundary())
                with gm.graph.inserting_before(node):
                    t = gm.graph.call_module(name, (t,))
                count += 1
            wrapped.append(t)
        node.args = (type(tensors)(wrapped), *node.args[1:])
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


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


class PackedConv2d(nn.Module):
    """A converted int8 ``Conv2d`` reduced to its one kernel call.

    ``torch.ao.nn.quantized.Conv2d.forward`` checks the input's rank and padding mode in Python
    before calling ``quantized::conv2d``; TorchScript runs those checks on every call, a fixed
    cost per layer (a few microseconds each) that does not shrink with the channels. The graph
    passes only 4-D tensors here, and the module is made only from zero-padded convolutions.
    """

    def __init__(self, conv: nn.Module):
        super().__init__()
        self._packed_params = conv._packed_params
        self.scale = float(conv.scale)
        self.zero_point = int(conv.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.conv2d(x, self._packed_params, self.scale, self.zero_point)


def lean_quantized_convs(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every converted int8 ``Conv2d`` (zero padding, no fused ReLU) by :class:`PackedConv2d`."""
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is QuantizedConv2d and mod.padding_mode == "zeros":
            parent_name, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, PackedConv2d(mod))
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


def pad_input_before_channels_last(gm: fx.GraphModule) -> bool:
    """When the graph's input goes only to a padding module, make the padded tensor channels-last
    (instead of the input, which the caller then leaves as it comes); True when done."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return False
    pad = next(iter(inputs[0].users))
    if not (pad.op == "call_module" and isinstance(gm.get_submodule(pad.target), _PADS)):
        return False
    with gm.graph.inserting_after(pad):
        convert = gm.graph.call_method("contiguous", (pad,), {"memory_format": torch.channels_last})
    pad.replace_all_uses_with(convert, delete_user_cb=lambda user: user is not convert)
    gm.graph.lint()
    gm.recompile()
    return True
