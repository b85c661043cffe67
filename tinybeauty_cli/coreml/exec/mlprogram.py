"""Reference executor for ML Programs (``.mlpackage``): the MIL program, evaluated with PyTorch.

The program is read back with coremltools' own MIL loader (:func:`..spec.load_program`);
every ``const`` becomes a tensor and every ``constexpr_*`` op (affine / blockwise dequantization, palettization,
sparsity, and their joint forms) is decompressed by coremltools' own
``materialized_val_inference``, so weights are exactly what the file holds. Each
compute op is then compiled once into a PyTorch call with its constant operands
(weights, pads, axes, epsilons) bound, following the MIL op definitions
(``coremltools.converters.mil.mil.ops.defs``). An op this module does not know, or a
variant of one it cannot reproduce exactly, is refused with its name: never a silent
approximation.

An input the program declares fp16 (tensor I/O of fp16 programs for iOS 16+) is rounded to
fp16 in every mode, as Core ML converts the caller's array, and so is an output declared fp16.
With ``fp16_emulation=True`` every op output the program types as fp16 is rounded to fp16
after it is produced, as fp16 hardware stores it; ops typed fp32 (the image tail of tbopt's
fp16 image files) stay fp32, and the arithmetic inside one op runs in fp32.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...core.errors import InputError, UnsupportedError
from ..spec import constexpr_values
from .graph import GraphBuilder, OpGraph, as_tensor, round_fp16
from .mil_ops import CONST_OPS, OPS, Ctx, dtype_name
from .quant_ops import QUANT_OPS


def _builder(op_type: str) -> Any:
    """The builder of an op type: the float ops' table, then the activation quantization ops' (looked
    up at compile time, so either table can be patched)."""
    return OPS.get(op_type) or QUANT_OPS.get(op_type)

# ---------------------------------------------------------------- the compiler

def materialize_constants(function: Any) -> dict[str, Any]:
    """Every constant of a MIL function by variable name: ``const`` values and decompressed
    ``constexpr_*`` outputs (coremltools' own decompression, in program order)."""
    consts: dict[str, Any] = {op.outputs[0].name: op.outputs[0].val for op in function.operations
                              if op.op_type in CONST_OPS}
    try:
        consts.update(constexpr_values(function))
    except Exception as exc:  # noqa: BLE001 - coremltools raises anything on a malformed constexpr op
        raise UnsupportedError(f"cannot decompress the file's weights: {type(exc).__name__}: {exc}") from exc
    return consts


def compile_function(function: Any, fp16_emulation: bool = False) -> OpGraph:
    """Compile a MIL function into an :class:`OpGraph` (unknown ops raise :class:`UnsupportedError`)."""
    unknown = sorted({op.op_type for op in function.operations
                      if _builder(op.op_type) is None and op.op_type not in CONST_OPS
                      and not op.op_type.startswith("constexpr_")})
    if unknown:
        raise UnsupportedError(f"the Core ML reference executor does not implement MIL op(s) {', '.join(unknown)}",
                               hint="run this model with Core ML on macOS")
    g = GraphBuilder()
    g.consts.update(materialize_constants(function))
    for name in function.inputs:
        g.slot(name)
    for op in function.operations:
        if op.op_type in CONST_OPS or op.op_type.startswith("constexpr_"):
            continue
        if getattr(op, "blocks", None):
            raise UnsupportedError(f"{op.op_type} {op.name!r}: control flow is not supported by the reference executor")
        try:
            fn, dyn = _builder(op.op_type)(op, Ctx(g.consts, op))
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise UnsupportedError(f"{op.op_type} {op.name!r}: cannot compile its parameters ({exc})") from exc
        outs = [o.name for o in op.outputs]
        if all(v.name in g.consts for v in dyn):  # constant subgraph: fold it once, now
            with torch.inference_mode():
                value = fn(*[as_tensor(g.consts[v.name]) for v in dyn])
            for name, v in zip(outs, value if len(outs) > 1 else (value,)):
                g.consts[name] = v
            continue
        rounded = [k for k, o in enumerate(op.outputs) if fp16_emulation and dtype_name(o) == "fp16"]
        g.add_step(op.name, op.op_type, fn, [v.name for v in dyn], outs, rounded)
    return g.finish(list(function.inputs), [v.name for v in function.outputs])


class MLProgramExecutor:
    """Evaluate an ML Program with PyTorch: ``run({input: tensor}) -> {output: tensor}``."""

    def __init__(self, program: Any, fp16_emulation: bool = False, function: str = "main"):
        if function not in program.functions:
            raise InputError(f"the ML Program has no function {function!r}")
        self.function = program.functions[function]
        self.fp16_emulation = fp16_emulation
        self.graph = compile_function(self.function, fp16_emulation)
        self.input_dtypes = {n: dtype_name(v) for n, v in self.function.inputs.items()}
        self.output_dtypes = {v.name: dtype_name(v) for v in self.function.outputs}

    def run(self, feeds: dict[str, torch.Tensor],
            observe: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
        """The outputs for ``feeds``; ``observe(name, value)`` sees every op's output (see :meth:`OpGraph.run`)."""
        # an input declared fp16 holds fp16 values whatever the caller passes: Core ML rounds it
        feeds = {n: round_fp16(t) if self.input_dtypes.get(n) == "fp16" else t for n, t in feeds.items()}
        outs = self.graph.run(feeds, observe)  # and an output declared fp16 is handed back as fp16 values
        return {n: round_fp16(t) if self.output_dtypes.get(n) == "fp16" else t for n, t in outs.items()}

    def op_counts(self) -> dict[str, int]:
        """Compute ops by type (constants folded at compile time are not counted)."""
        return self.graph.op_counts()

    def compute_precision(self) -> str:
        """fp16 / fp32 / mixed, from the output types of the ops that carry weights (or of all ops)."""
        ops = [op for op in self.function.operations if op.op_type not in CONST_OPS
               and not op.op_type.startswith("constexpr_") and op.op_type != "cast"]
        heavy = [op for op in ops if op.op_type in ("conv", "conv_transpose", "linear", "matmul")] or ops
        kinds = {dtype_name(op.outputs[0]) for op in heavy} & {"fp16", "fp32"}
        return "mixed" if len(kinds) > 1 else (kinds.pop() if kinds else "fp32")

    def fp32_op_counts(self) -> dict[str, int]:
        """Compute ops typed fp32 by type (casts aside): in an fp16 program, the image scaling and
        the image post-processing tbopt keeps in fp32."""
        counts: dict[str, int] = {}
        for op in self.function.operations:
            if (op.op_type not in CONST_OPS and not op.op_type.startswith("constexpr_") and op.op_type != "cast"
                    and op.outputs and dtype_name(op.outputs[0]) == "fp32"):
                counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return counts

    def weight_summary(self) -> dict[str, Any]:
        """How the weights are stored: op types of the compressed ones, element counts."""
        return summarize_weights(self.function)


def summarize_weights(function: Any) -> dict[str, Any]:
    """Counts of compressed weight tensors by their decompression chain, e.g.
    ``constexpr_lut_to_sparse+constexpr_sparse_to_dense`` for joint sparse + palettized."""
    def producers(op: Any) -> list[str]:
        chain: list[str] = []
        for inp in op.inputs.values():
            for v in inp if isinstance(inp, (list, tuple)) else (inp,):
                if v is not None and v.op is not None and v.op.op_type.startswith("constexpr_"):
                    chain += [t for t in producers(v.op) + [v.op.op_type] if t not in chain]
        return chain

    feeding: set[str] = set()
    for op in function.operations:
        if op.op_type.startswith("constexpr_"):
            for inp in op.inputs.values():
                for v in inp if isinstance(inp, (list, tuple)) else (inp,):
                    if v is not None and v.op is not None:
                        feeding.add(v.op.name)
    compression: dict[str, int] = {}
    for op in function.operations:  # the last op of each decompression chain, once
        if op.op_type.startswith("constexpr_") and op.name not in feeding:
            key = "+".join(producers(op) + [op.op_type])
            compression[key] = compression.get(key, 0) + 1
    return {"compressed_tensors": compression}
