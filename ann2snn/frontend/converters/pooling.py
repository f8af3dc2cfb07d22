"""MaxPool, AveragePool, GlobalAveragePool (1-D and 2-D) -> nn.MaxPool / nn.AvgPool / nn.AdaptiveAvgPool.

A MaxPool's padding counts as -inf. Asymmetric padding (begin, end), as TensorFlow's SAME makes it,
is torch's symmetric padding `begin` when that gives as many windows, with or without ceil_mode:
the windows start at the same places, and what lies past the end counts as -inf in both. Other
padding torch cannot take itself (wider than half the kernel) is applied first with F.pad: -inf
for MaxPool; zeros for AveragePool, whose divisor then counts the pad (count_include_pad=1) or is
corrected by a constant map of the valid counts (count_include_pad=0).

A Pad in front of a MaxPool becomes the pooling's own padding where that is exact (_max_pool_takes),
so that the MaxPool stays directly on its activation site and can move before it.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import add_converter
from .utils import Pairs, PadValue, native_padding, spatial_padding, take_pad, torch_pad

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


def windows_reach_image(kernel: list[int], dilations: list[int], ceil_mode: bool, pairs: Pairs) -> bool:
    """Every pooling window holds a pixel of the image. Sure for contiguous windows (dilation 1, no
    ceil_mode) whose padding on each side is shorter than the kernel: the first window ends, and
    the last one starts, inside the image."""
    return not ceil_mode and all(d == 1 for d in dilations) and all(max(p) < k for p, k in zip(pairs, kernel))


def _max_pool_takes(pad: PadValue, combined: Pairs, kernel: list[int], dilations: list[int], ceil_mode: bool) -> bool:
    """Pad-then-MaxPool equals MaxPool padded by `combined` (counted as -inf, i.e. the max over the
    window clipped to the image): for a -inf constant, always; for a constant no larger than the
    input (0 on a non-negative input), and for edge padding, when every window reaches the image:
    its max then is at least the constant, and a contiguous window that reaches past the border
    already holds the border pixel that edge padding repeats."""
    if pad.mode == "constant" and pad.value == -math.inf:
        return True
    below_input = pad.mode == "edge" or (pad.mode == "constant" and pad.non_negative and pad.value <= 0)
    return below_input and windows_reach_image(kernel, dilations, ceil_mode, combined)


def _torch_windows(size: int, pad: int, window: int, stride: int, ceil_mode: bool) -> int:
    """How many windows torch's pooling makes with padding `pad` on both sides (its output size)."""
    rounding = math.ceil if ceil_mode else math.floor
    count = rounding((size + 2 * pad - window) / stride) + 1
    if ceil_mode and (count - 1) * stride >= size + pad:  # no window may start in the end padding
        count -= 1
    return count


def _max_pool_padding(sizes: tuple[int, ...], pairs: Pairs, kernel: list[int], strides: list[int],
                      dilations: list[int], ceil_mode: bool) -> tuple[tuple[int, ...] | None, bool]:
    """The padding and ceil_mode of torch's MaxPool for ONNX's `pairs` (see the module docstring), or
    (None, ceil_mode) when torch cannot take the padding itself."""
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    padding = native_padding(pairs, [e / 2 for e in extents])  # torch allows up to half the kernel
    if padding is not None or ceil_mode:
        return padding, ceil_mode
    begins = tuple(begin for begin, _ in pairs)
    if any(begin > e / 2 for begin, e in zip(begins, extents)):
        return None, ceil_mode
    wanted = [(n + b + e - k) // s + 1 for n, (b, e), k, s in zip(sizes, pairs, extents, strides)]
    for ceil in (False, True):
        if wanted == [_torch_windows(n, b, k, s, ceil) for n, b, k, s in zip(sizes, begins, extents, strides)]:
            return begins, ceil
    return None, ceil_mode


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
    x, pairs = take_pad(ctx, x, pairs, lambda pad, combined: _max_pool_takes(pad, combined, kernel, dilations,
                                                                              ceil_mode))
    padding, ceil_mode = _max_pool_padding(ctx.shape(x)[2:], pairs, kernel, strides, dilations, ceil_mode)
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
