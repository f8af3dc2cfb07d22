"""QuantizeLinear -> DequantizeLinear on the data -> one QuantDequant (a fake quantization).

A DequantizeLinear of a constant (quantized weights and biases) never gets here: the builder folds
it into a float constant. A QuantizeLinear must be undone by a DequantizeLinear with the same
scale and zero point; its integer output is used by nothing else.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from onnx import TensorProto, helper

from ..builder import Quantized, sanitize
from ...runtime.quant import QuantDequant
from ..reader import type_name
from ..registry import add_converter
from .utils import normalize_axis

# The integer range of each quantized type.
QUANT_RANGES = {
    TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7),
}
if hasattr(TensorProto, "UINT2"):
    QUANT_RANGES.update({TensorProto.UINT2: (0, 3), TensorProto.INT2: (-2, 1)})

_VERSIONS = (10, 13, 19, 21, 23, 24, 25, 28)


def _params(ctx, data_rank: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """scale, zero point (or None) and the normalized axis of a Q or DQ node."""
    scale = ctx.constant(1, "scale")
    zero_point = ctx.constant(2, "zero_point")
    block_size = ctx.attr("block_size", 0)
    if block_size:
        ctx.unsupported("block_size", block_size, "blocked quantization of activations")
    axis = ctx.attr("axis", 1)
    _check_scale(ctx, scale, zero_point)
    if scale.size == 1:  # per tensor: the spec ignores axis
        return scale.reshape(-1), zero_point, 1
    axis = normalize_axis(ctx, axis, data_rank)
    if axis == 0:
        ctx.unsupported("axis", ctx.attr("axis", 1), "per-axis quantization along the batch dimension")
    return scale.reshape(-1), zero_point, axis


def _check_scale(ctx, scale: np.ndarray, zero_point: np.ndarray | None) -> None:
    """A step must be positive and finite: x / 0 is inf or NaN, a negative step mirrors the grid,
    and the sites read theta = scale."""
    if scale.dtype.kind != "f":
        ctx.fail(f"scale has dtype {scale.dtype}; a float is needed")
    if scale.ndim > 1:
        ctx.fail(f"scale has shape {list(scale.shape)}; a scalar or one per channel (1-D) is needed")
    values = np.asarray(scale, dtype=np.float64).reshape(-1)
    if values.size == 0:
        ctx.fail("scale is empty")
    bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
    if bad.size:
        where = f"scale[{bad[0]}]" if values.size > 1 else "scale"
        ctx.fail(f"{where} is {values[bad[0]]:g}; a quantization step must be positive and finite")
    if zero_point is not None and zero_point.size != values.size:
        ctx.fail(f"{zero_point.size} zero points for {values.size} scales")


def _numpy_type(ctx, attribute: str, data_type: int) -> np.dtype:
    """The numpy dtype of a data-type attribute (refused when onnx knows no such type)."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError):
        ctx.unsupported(attribute, data_type, "not an ONNX data type")


def convert_quantize(ctx) -> list:
    x = ctx.dynamic(0)
    shape = ctx.shape(x)
    scale, zero_point, axis = _params(ctx, len(shape))
    ctx.attr("saturate")  # float8 only
    precision = ctx.attr("precision", 0)
    if zero_point is not None:
        dtype = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    else:
        dtype = ctx.attr("output_dtype", 0) or TensorProto.UINT8
    if dtype not in QUANT_RANGES:
        ctx.fail(f"quantized type {type_name(dtype)} is not supported (integer types only)")
    if precision and _numpy_type(ctx, "precision", precision) != ctx.probe(x).numpy().dtype:
        ctx.unsupported("precision", type_name(precision), "a division in another precision than the data's")
    if scale.size > 1 and scale.size != shape[axis]:
        ctx.fail(f"{scale.size} scales for dimension {axis} of size {shape[axis]}")
    zero = np.zeros(scale.shape) if zero_point is None else zero_point.astype(np.float64).reshape(-1)
    qmin, qmax = QUANT_RANGES[dtype]
    with np.errstate(over="ignore"):  # the largest level must be a number in the data's precision
        top = scale.astype(ctx.probe(x).numpy().dtype) * max(-qmin, qmax)
    if not np.all(np.isfinite(top)):
        ctx.fail(f"scale {float(scale.max()):g} times {max(-qmin, qmax)} levels overflows {ctx.probe(x).dtype}")
    return [ctx.builder.quantized(Quantized(x, scale, zero, qmin, qmax, axis, ctx.node.name))]


def clip_levels(ctx, q: Quantized, low: float | None, high: float | None) -> Quantized:
    """QCDQ: a Clip of QuantizeLinear's integers narrows their range, so the pair quantizes to
    fewer levels (Clip(0, 15) of uint8: 4 bits). The clipped integers are the pair's levels, read
    back from the Clip's output (ort_check)."""
    qmin = q.qmin if low is None else max(q.qmin, math.ceil(low))
    qmax = q.qmax if high is None else min(q.qmax, math.floor(high))
    if qmin >= qmax:
        ctx.fail(f"clips the integers of QuantizeLinear {q.node_name!r} to [{qmin}, {qmax}]: fewer than two levels")
    q.fused["clip"] = ctx.node.name   # undone through the Clip: not an unfused QuantizeLinear
    return ctx.builder.quantized(replace(q, qmin=qmin, qmax=qmax, node_name=ctx.node.name, fused={}))


def convert_dequantize(ctx) -> list:
    q = ctx.input(0)
    if not isinstance(q, Quantized):
        ctx.fail("DequantizeLinear of the network's data needs a QuantizeLinear before it")
    scale, zero_point, axis = _params(ctx, len(ctx.shape(q.source)))
    zero = np.zeros(scale.shape) if zero_point is None else zero_point.astype(np.float64).reshape(-1)
    output_dtype = ctx.attr("output_dtype", 0)
    if output_dtype and _numpy_type(ctx, "output_dtype", output_dtype) != scale.dtype:
        ctx.unsupported("output_dtype", type_name(output_dtype), "a type other than the scale's")
    per_axis = scale.size > 1 or q.scale.size > 1
    if (scale.size != q.scale.size or not np.array_equal(scale, q.scale) or not np.array_equal(zero, q.zero_point)
            or (per_axis and axis != q.axis)):
        ctx.fail(f"scale / zero point / axis differ from those of QuantizeLinear {q.node_name!r}: "
                 "only a QuantizeLinear -> DequantizeLinear pair that undoes itself is supported")
    if "node" not in q.fused:  # several DequantizeLinear of one QuantizeLinear share one module
        dtype = ctx.probe(q.source).dtype
        module = QuantDequant(torch.from_numpy(scale.copy()).to(dtype), torch.from_numpy(zero).to(dtype),
                              q.qmin, q.qmax, axis if per_axis else 1)
        node = ctx.builder.call_module(module, (q.source,), sanitize(q.node_name, "quant_dequant"), ctx.node)
        node.meta["onnx_nodes"] = [q.node_name, ctx.node.name]
        q.fused["node"] = node
    return [q.fused["node"]]


for _version in _VERSIONS:
    add_converter("QuantizeLinear", _version)(convert_quantize)
    add_converter("DequantizeLinear", _version)(convert_dequantize)
