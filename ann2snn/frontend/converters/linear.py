"""Gemm and MatMul with a constant weight -> nn.Linear (alpha and beta folded in); else torch.matmul."""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch import nn

from ..registry import add_converter
from .utils import check_batch_broadcast


def _linear(ctx, x, weight: np.ndarray, bias: np.ndarray | None) -> object:
    """x @ weight.T + bias as an nn.Linear; `weight` is [out, in]."""
    # built on the meta device: its random initial weights, replaced at once, would cost memory
    # and time the size of the layer
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    dtype = ctx.probe(x).dtype
    layer.weight = nn.Parameter(torch.from_numpy(np.array(weight, copy=True)).to(dtype))
    if bias is not None:
        layer.bias = nn.Parameter(torch.from_numpy(np.array(bias, copy=True)).to(dtype))
    return ctx.call_module(layer, x)


@add_converter("Gemm", 11)
@add_converter("Gemm", 13)
def convert_gemm(ctx) -> list:
    """Y = alpha * A' B' + beta * C with A the data (not transposed: its rows are the batch)."""
    a = ctx.dynamic(0)
    if ctx.attr("transA"):
        ctx.unsupported("transA", 1, "A is the batch-major data; transposing it would move the batch")
    b = ctx.constant(1, "B")
    c = ctx.constant(2, "C")
    alpha, beta = ctx.attr("alpha"), ctx.attr("beta")
    weight = alpha * (b if ctx.attr("transB") else b.T)  # [out, in]
    out = weight.shape[0]
    if c is None or beta == 0:
        return [_linear(ctx, a, weight, None)]
    c = beta * c
    if c.size in (1, out) and (c.ndim < 2 or c.shape[0] == 1):
        return [_linear(ctx, a, weight, np.broadcast_to(c.reshape(-1), (out,)).copy())]
    # C varies along a fixed batch: add it as a constant after the layer.
    check_batch_broadcast(ctx, c, 2)
    y = _linear(ctx, a, weight, None)
    return [ctx.call_function(operator.add, y, ctx.tensor(c), suffix="_bias")]


@add_converter("MatMul", 9)
@add_converter("MatMul", 13)
def convert_matmul(ctx) -> list:
    left, right = ctx.input(0), ctx.input(1)
    if not ctx.is_dynamic(1):
        b = ctx.constant(1, "B")
        x = ctx.dynamic(0)
        if len(ctx.shape(x)) < 2:
            ctx.fail("a rank-1 data operand would contract the batch dimension")
        if b.ndim == 2:
            return [_linear(ctx, x, b.T, None)]
        return [ctx.call_function(torch.matmul, x, ctx.tensor(b))]
    # the data on the right: its batch must not be contracted, so it needs rank >= 3
    if len(ctx.shape(right)) < 3 or (ctx.is_dynamic(0) and len(ctx.shape(left)) < 3):
        ctx.fail("a MatMul with the data as right operand needs batched (rank >= 3) operands")
    return [ctx.call_function(torch.matmul, ctx.tensor(left), right)]
