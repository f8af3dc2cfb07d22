"""Identity and inference Dropout (pass-through), Pad -> F.pad, ReduceMean -> torch.mean.

Pad: constant, edge and reflect modes (a Conv or MaxPool behind it takes it as its own padding where
that is exact: conv.py, pooling.py). Edge and reflect padding copy values, so they pad spike planes
and potentials alike; they widen the dimensions after the channels only (pad_support, which
`inspect` runs too).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ...ops import PAD_MODES
from ...compile.qdq_to_sites import is_non_negative
from ..registry import GraphView, add_converter, add_support_check
from .utils import (PadValue, axes_argument, check_padded_size, ints, normalize_axis, refuse_batch_move,
                    torch_pad)


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


@add_support_check("Pad")
def pad_support(node: onnx.NodeProto, view: GraphView) -> str | None:
    """None for constant padding, and for padding that copies values (edge, reflect: ops.PAD_MODES)
    of the dimensions after the channels by constant pads (fold_constants.py folds computed ones);
    else why not."""
    mode = view.attributes(node)["mode"]
    if mode not in PAD_MODES:
        return f"attribute mode={mode!r} is not supported (supported: {', '.join(PAD_MODES)})"
    if not PAD_MODES[mode].copies_values:
        return None
    refused = f"attribute mode={mode!r} is supported only"
    pads = view.constant(node, 1)
    if pads is None or (len(node.input) > 3 and node.input[3] and view.constant(node, 3) is None):
        return f"{refused} with constant pads and axes (these depend on the network's data or batch size)"
    pads = ints(pads)
    axes = ints(view.constant(node, 3)) if len(node.input) > 3 and node.input[3] else range(len(pads) // 2)
    if any(p < 0 for p in pads) or any(p for axis, begin, end in zip(axes, pads, pads[len(pads) // 2:])
                                       if axis in (0, 1) for p in (begin, end)):
        return f"{refused} to widen the dimensions after the channels (pads {pads})"
    return None


@add_converter("Pad", 11)
@add_converter("Pad", 13)
@add_converter("Pad", 18)
@add_converter("Pad", 19)
@add_converter("Pad", 21)
@add_converter("Pad", 23)
@add_converter("Pad", 24)
@add_converter("Pad", 25)
def convert_pad(ctx) -> list:
    """F.pad; the node remembers the padding (PadValue) for a Conv or MaxPool to take it over."""
    x = ctx.dynamic(0)
    mode = ctx.attr("mode")  # as pad_support allowed it
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
    if PAD_MODES[mode].copies_values:   # torch copies along the dimensions after the channels only
        if pairs[1] != (0, 0):
            ctx.fail(f"attribute mode={mode!r} is supported only to widen the dimensions after the channels "
                     f"(pads {pads})")
        padded = ctx.call_function(F.pad, x, torch_pad(pairs[2:]), mode=PAD_MODES[mode].torch_mode)
    else:
        padded = ctx.call_function(F.pad, x, torch_pad(pairs[1:]), value=fill)
    if pairs[1] == (0, 0) and all(p >= 0 for pair in pairs for p in pair):  # spatial widening only
        padded.meta["onnx_pad"] = PadValue(ctx.node.name, x, pairs[2:], mode, fill if mode == "constant" else 0.0,
                                           is_non_negative(ctx.builder.root, x))
    return [padded]


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
