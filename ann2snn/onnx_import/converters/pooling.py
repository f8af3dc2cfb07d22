"""MaxPool, AveragePool, GlobalAveragePool (1-D and 2-D) -> nn.MaxPool / nn.AvgPool / nn.AdaptiveAvgPool.

Padding torch cannot take itself (asymmetric, or wider than half the kernel) is applied first with
F.pad: -inf for MaxPool; zeros for AveragePool, whose divisor then counts the pad
(count_include_pad=1) or is corrected by a constant map of the valid counts (count_include_pad=0).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import add_converter
from .utils import native_padding, spatial_padding, torch_pad

_MAX_POOLS = {3: nn.MaxPool1d, 4: nn.MaxPool2d}
_AVG_POOLS = {3: nn.AvgPool1d, 4: nn.AvgPool2d}
_GLOBAL_POOLS = {3: nn.AdaptiveAvgPool1d, 4: nn.AdaptiveAvgPool2d}


def _window(ctx, x) -> tuple[tuple[int, ...], list[int], list[int], list[int], list[tuple[int, int]]]:
    shape = ctx.shape(x)
    if len(shape) not in _MAX_POOLS:
        ctx.fail(f"a rank-{len(shape)} input is not supported (1-D and 2-D pooling only)")
    spatial = len(shape) - 2
    kernel = ctx.attr("kernel_shape")
    strides = ctx.attr("strides") or [1] * spatial
    dilations = ctx.attr("dilations") or [1] * spatial
    return shape, kernel, strides, dilations, spatial_padding(ctx, shape[2:], kernel, strides, dilations)


@add_converter("MaxPool", 11)
@add_converter("MaxPool", 12)
@add_converter("MaxPool", 22)
def convert_max_pool(ctx) -> list:
    x = ctx.dynamic(0)
    shape, kernel, strides, dilations, pairs = _window(ctx, x)
    ctx.attr("storage_order")  # only shapes the Indices output, refused below
    if ctx.output_used(1):
        ctx.fail("the Indices output is not supported")
    ceil_mode = bool(ctx.attr("ceil_mode"))
    # torch allows padding up to half the (dilated) kernel
    padding = native_padding(pairs, [((k - 1) * d + 1) / 2 for k, d in zip(kernel, dilations)])
    if padding is None:
        if ceil_mode:
            ctx.unsupported("ceil_mode", 1, f"together with pads {ctx.attr('pads')}")
        x = ctx.call_function(F.pad, x, torch_pad(pairs), value=-math.inf, suffix="_pad")
        padding = 0
    pool = _MAX_POOLS[len(shape)](kernel, strides, padding, dilations, ceil_mode=ceil_mode)
    return [ctx.call_module(pool, x)]


@add_converter("AveragePool", 11)
@add_converter("AveragePool", 19)
@add_converter("AveragePool", 22)
def convert_average_pool(ctx) -> list:
    x = ctx.dynamic(0)
    shape, kernel, strides, dilations, pairs = _window(ctx, x)
    if any(d != 1 for d in dilations):
        ctx.unsupported("dilations", dilations, "torch's average pooling has no dilation")
    ceil_mode = bool(ctx.attr("ceil_mode"))
    include_pad = bool(ctx.attr("count_include_pad"))
    padding = native_padding(pairs, [k / 2 for k in kernel])
    if padding is not None:
        pool = _AVG_POOLS[len(shape)](kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=include_pad)
        return [ctx.call_module(pool, x)]
    if ceil_mode:
        ctx.unsupported("ceil_mode", 1, f"together with pads {ctx.attr('pads')}")
    padded = ctx.call_function(F.pad, x, torch_pad(pairs), suffix="_pad")
    pooled = ctx.call_module(_AVG_POOLS[len(shape)](kernel, strides, 0), padded)
    if include_pad:
        return [pooled]
    # Divide by the valid elements of each window, not the kernel size: a constant map of the
    # fraction of each window inside the input.
    with torch.no_grad():
        ones = torch.ones((1, 1, *shape[2:]), dtype=ctx.probe(x).dtype)
        valid = _AVG_POOLS[len(shape)](kernel, strides, 0)(F.pad(ones, torch_pad(pairs)))
    return [ctx.call_function(operator.truediv, pooled, ctx.tensor(valid.numpy(), f"{ctx.name}_valid_fraction"),
                              suffix="_valid")]


@add_converter("GlobalAveragePool", 1)
@add_converter("GlobalAveragePool", 22)
def convert_global_average_pool(ctx) -> list:
    x = ctx.dynamic(0)
    rank = len(ctx.shape(x))
    if rank not in _GLOBAL_POOLS:
        ctx.fail(f"a rank-{rank} input is not supported (1-D and 2-D pooling only)")
    return [ctx.call_module(_GLOBAL_POOLS[rank](1), x)]
