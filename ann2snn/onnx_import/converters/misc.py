"""Identity and inference Dropout (pass-through), Pad (constant mode) -> F.pad, ReduceMean -> torch.mean."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import add_converter
from .utils import axes_argument, check_padded_size, ints, normalize_axis, refuse_batch_move, torch_pad


@add_converter("Identity", 1)
@add_converter("Identity", 13)
@add_converter("Identity", 14)
@add_converter("Identity", 16)
@add_converter("Identity", 19)
@add_converter("Identity", 21)
@add_converter("Identity", 23)
@add_converter("Identity", 24)
@add_converter("Identity", 25)
def convert_identity(ctx) -> list:
    return [ctx.dynamic(0)]


@add_converter("Dropout", 10)
@add_converter("Dropout", 12)
@add_converter("Dropout", 13)
@add_converter("Dropout", 22)
def convert_dropout(ctx) -> list:
    """Inference dropout is the identity."""
    ctx.attr("seed"), ctx.attr("ratio")  # only matter in training
    training = ctx.constant(2, "training_mode")
    if training is not None and bool(training):
        ctx.fail("training_mode=True is not supported (inference only)")
    if ctx.output_used(1):
        ctx.fail("the mask output is not supported")
    return [ctx.dynamic(0)]


@add_converter("Pad", 11)
@add_converter("Pad", 13)
@add_converter("Pad", 18)
@add_converter("Pad", 19)
@add_converter("Pad", 21)
@add_converter("Pad", 23)
@add_converter("Pad", 24)
@add_converter("Pad", 25)
def convert_pad(ctx) -> list:
    x = ctx.dynamic(0)
    mode = ctx.attr("mode")
    if mode != "constant":
        ctx.unsupported("mode", mode, "only constant padding")
    rank = len(ctx.shape(x))
    pads = ints(ctx.constant(1, "pads"))
    value = ctx.constant(2, "constant_value")
    axes = ctx.constant(3, "axes")
    axes = list(range(rank)) if axes is None else [normalize_axis(ctx, a, rank, "axes") for a in ints(axes)]
    if len(pads) != 2 * len(axes):
        ctx.fail(f"pads {pads} do not match {len(axes)} axes")
    pairs = [(0, 0)] * rank
    for k, axis in enumerate(axes):
        pairs[axis] = (pads[k], pads[k + len(axes)])
    if pairs[0] != (0, 0):
        refuse_batch_move(ctx, f"padding dimension 0 by {pairs[0]}")
    check_padded_size(ctx, ctx.shape(x)[1:], pairs[1:])
    fill = 0.0 if value is None or value.size == 0 else float(np.asarray(value).reshape(-1)[0])
    return [ctx.call_function(F.pad, x, torch_pad(pairs[1:]), value=fill)]


@add_converter("ReduceMean", 11)
@add_converter("ReduceMean", 13)
@add_converter("ReduceMean", 18)
def convert_reduce_mean(ctx) -> list:
    x = ctx.dynamic(0)
    rank = len(ctx.shape(x))
    axes = axes_argument(ctx, rank)
    keepdims = bool(ctx.attr("keepdims"))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    if 0 in axes:
        refuse_batch_move(ctx, "averaging over dimension 0")
    return [ctx.call_function(torch.mean, x, tuple(axes), keepdim=keepdims)]
