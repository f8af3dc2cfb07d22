"""Relu -> nn.ReLU; Clip(0, c) -> nn.Hardtanh(0, c); other clips, and Min / Max with a constant, -> torch.clamp.

The activation-site pass (ann2snn/compile/qdq_to_sites.py) recognizes exactly these forms as ReLU-like.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from ..builder import Quantized
from ..registry import add_converter
from .quantize import clip_levels


@add_converter("Relu", 6)
@add_converter("Relu", 13)
@add_converter("Relu", 14)
def convert_relu(ctx) -> list:
    return [ctx.call_module(nn.ReLU(), ctx.dynamic(0))]


def _scalar(ctx, index: int, what: str) -> float | None:
    value = ctx.constant(index, what)
    if value is None:
        return None
    if value.size != 1:
        ctx.fail(f"{what} must be a scalar, got shape {list(value.shape)}")
    return float(value.reshape(()))


def clamp(ctx, x, low: float | None, high: float | None) -> list:
    """The clamp of x to [low, high] in the form the compiler's passes read."""
    low = None if low is None or low == -math.inf else low
    high = None if high is None or high == math.inf else high
    if low == 0 and high is None:
        return [ctx.call_module(nn.ReLU(), x)]
    if low == 0 and high is not None and high > 0:
        return [ctx.call_module(nn.Hardtanh(0.0, high), x)]
    if low is None and high is None:
        return [x]
    return [ctx.call_function(torch.clamp, x, min=low, max=high)]


@add_converter("Clip", 11)
@add_converter("Clip", 12)
@add_converter("Clip", 13)
def convert_clip(ctx) -> list:
    x, low, high = ctx.input(0), _scalar(ctx, 1, "min"), _scalar(ctx, 2, "max")
    if isinstance(x, Quantized):   # QCDQ: between QuantizeLinear and DequantizeLinear
        return [clip_levels(ctx, x, low, high)]
    return clamp(ctx, ctx.dynamic(0), low, high)


def _min_max(ctx, bound: str) -> list:
    """Min / Max of the data and one constant: a clamp from above / below.

    A scalar constant becomes a float bound; a per-channel one (e.g. [1, C, 1, 1], as ann2snn's
    exporter writes per-channel clips) a get_attr buffer.
    """
    if len(ctx.node.input) != 2:
        ctx.fail(f"{len(ctx.node.input)} inputs: only the data and one constant are supported")
    data = 0 if ctx.is_dynamic(0) else 1
    x = ctx.dynamic(data)
    value = ctx.constant(1 - data, "the constant operand")
    rank = len(ctx.shape(x))
    if value.ndim > rank or (value.ndim == rank and value.shape[0] != 1):
        ctx.fail(f"a constant of shape {list(value.shape)} broadcasts across the batch dimension")
    if value.size == 1:
        c = float(np.asarray(value).reshape(()))
        return clamp(ctx, x, c, None) if bound == "min" else clamp(ctx, x, None, c)
    return [ctx.call_function(torch.clamp, x, **{bound: ctx.tensor(value)})]


@add_converter("Max", 8)
@add_converter("Max", 12)
@add_converter("Max", 13)
def convert_max(ctx) -> list:
    return _min_max(ctx, "min")


@add_converter("Min", 8)
@add_converter("Min", 12)
@add_converter("Min", 13)
def convert_min(ctx) -> list:
    return _min_max(ctx, "max")


def _output_op(ctx, make: type[nn.Module], opset_13_semantics: bool) -> list:
    """Softmax / LogSoftmax over one axis. Before opset 13 they act on the input flattened from
    `axis` on: the same as one axis only when that axis is the last."""
    x = ctx.dynamic(0)
    rank = len(ctx.shape(x))
    axis = ctx.attr("axis", -1 if opset_13_semantics else 1)
    axis = axis + rank if axis < 0 else axis
    if not 1 <= axis < rank:
        ctx.fail(f"axis {axis} of a rank-{rank} input: only a class axis after the batch is supported")
    if not opset_13_semantics and axis != rank - 1:
        ctx.fail(f"axis {axis} of a rank-{rank} input acts on the flattened trailing dimensions before opset 13: "
                 "only the last axis is supported")
    return [ctx.call_module(make(dim=axis), x)]


# Output operations (ann2snn/ops.OUTPUT_OPS): allowed only after the last layer.
for _op, _module in (("Softmax", nn.Softmax), ("LogSoftmax", nn.LogSoftmax)):
    add_converter(_op, 11)(functools.partial(_output_op, make=_module, opset_13_semantics=False))
    add_converter(_op, 13)(functools.partial(_output_op, make=_module, opset_13_semantics=True))


@add_converter("Sigmoid", 6)
@add_converter("Sigmoid", 13)
def convert_sigmoid(ctx) -> list:
    return [ctx.call_module(nn.Sigmoid(), ctx.dynamic(0))]
