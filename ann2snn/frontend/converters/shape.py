"""Structural ops: Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Concat, and the shape arithmetic
(Shape, Gather, Slice, ReduceProd, Cast, Constant, ConstantOfShape, Range) that exporters put before a
Reshape.

Dimension 0 is the batch and must stay there: an op that would move or merge it is refused. Shape
arithmetic is folded at import (builder.BatchDependent), so a Reshape gets a constant target with
-1 for the batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import helper
from torch import fx, nn

from ..fold_constants import BATCH_PROBES, BatchDependent
from ..registry import add_converter
from .utils import axes_argument, ints, normalize_axis, refuse_batch_move


@add_converter("Flatten", 11)
@add_converter("Flatten", 13)
@add_converter("Flatten", 21)
@add_converter("Flatten", 23)
@add_converter("Flatten", 24)
@add_converter("Flatten", 25)
def convert_flatten(ctx) -> list:
    x = ctx.dynamic(0)
    shape = ctx.shape(x)
    axis = ctx.attr("axis")
    if not -len(shape) <= axis <= len(shape):
        ctx.unsupported("axis", axis, f"out of range for rank {len(shape)}")
    axis = axis % len(shape) if axis != len(shape) else axis
    if axis == 1:
        return [ctx.call_module(nn.Flatten(1, -1), x)]
    if axis == 0 or math.prod(shape[1:axis]) != 1:
        ctx.unsupported("axis", ctx.attr("axis"), f"flattening {list(shape)} there merges the batch dimension")
    return [ctx.call_function(torch.reshape, x, (-1, math.prod(shape[axis:])))]


def _resolve(in_shape: tuple[int, ...], target: np.ndarray, allowzero: int) -> tuple[int, ...] | None:
    """ONNX Reshape's output shape (0 copies a dimension, -1 is inferred), or None if invalid."""
    out = []
    for i, v in enumerate(ints(target)):
        if v == 0 and not allowzero:
            if i >= len(in_shape):
                return None
            v = in_shape[i]
        out.append(v)
    total, known = math.prod(in_shape), math.prod(v for v in out if v != -1)
    if out.count(-1) > 1 or known == 0:
        return None
    if -1 in out:
        if total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if math.prod(out) == total else None


def _check_target(ctx, target: list[int]) -> None:
    """What the spec allows in a Reshape target: sizes, 0 (copy), and one -1 (inferred)."""
    bad = [v for v in target if v < -1]
    if bad:
        ctx.fail(f"shape {target} holds {bad[0]}; the only negative size allowed is -1 (inferred)")
    if target.count(-1) > 1:
        ctx.fail(f"shape {target} holds -1 {target.count(-1)} times; only one size can be inferred")


@add_converter("Reshape", 5)
@add_converter("Reshape", 13)
@add_converter("Reshape", 14)
@add_converter("Reshape", 19)
@add_converter("Reshape", 21)
@add_converter("Reshape", 23)
@add_converter("Reshape", 24)
@add_converter("Reshape", 25)
def convert_reshape(ctx) -> list:
    x = ctx.dynamic(0)
    target = ctx.input(1)
    allowzero = ctx.attr("allowzero", 0)
    if isinstance(target, BatchDependent):
        targets = target.values
    else:
        target = ctx.constant(1, "shape").astype(np.int64)
        if allowzero and 0 in target:
            ctx.unsupported("allowzero", 1, f"with a 0 in the shape {ints(target)}")
        targets = (target, target)
        if target.size and target[0] == ctx.builder.declared_batch:  # a fixed-batch export's batch
            targets = tuple(np.concatenate([[b], target[1:]]) for b in BATCH_PROBES)
    for t in targets:
        _check_target(ctx, ints(t))
    static = ctx.shape(x)[1:]
    outs = [_resolve((b, *static), t, allowzero) for b, t in zip(BATCH_PROBES, targets)]
    if None in outs or any(out[0] != b for out, b in zip(outs, BATCH_PROBES)) or outs[0][1:] != outs[1][1:]:
        refuse_batch_move(ctx, f"reshaping [N, {', '.join(map(str, static))}] to {ints(targets[0])}")
    return [ctx.call_function(torch.reshape, x, (-1, *outs[0][1:]))]


@add_converter("Squeeze", 11)
@add_converter("Squeeze", 13)
@add_converter("Squeeze", 21)
@add_converter("Squeeze", 23)
@add_converter("Squeeze", 24)
@add_converter("Squeeze", 25)
def convert_squeeze(ctx) -> list:
    x = ctx.dynamic(0)
    shape = ctx.shape(x)
    axes = axes_argument(ctx, len(shape))
    if axes is None:  # every size-1 dimension, except the batch, whose size is not fixed
        axes = [i for i in range(1, len(shape)) if shape[i] == 1]
    if 0 in axes:
        refuse_batch_move(ctx, "squeezing dimension 0")
    if any(shape[a] != 1 for a in axes):
        ctx.fail(f"cannot squeeze axes {axes} of shape {list(shape)}")
    if not axes:
        return [x]
    return [ctx.call_function(torch.squeeze, x, tuple(axes))]


@add_converter("Unsqueeze", 11)
@add_converter("Unsqueeze", 13)
@add_converter("Unsqueeze", 21)
@add_converter("Unsqueeze", 23)
@add_converter("Unsqueeze", 24)
@add_converter("Unsqueeze", 25)
def convert_unsqueeze(ctx) -> list:
    x = ctx.dynamic(0)
    rank = len(ctx.shape(x))
    raw = ctx.constant(1, "axes") if ctx.has_input(1) else ctx.attr("axes")
    axes = sorted(normalize_axis(ctx, a, rank + len(ints(raw)), "axes") for a in ints(raw))
    if 0 in axes:
        refuse_batch_move(ctx, "inserting dimension 0")
    for k, axis in enumerate(axes):  # ascending output positions: each insert keeps the earlier ones
        x = ctx.call_function(torch.unsqueeze, x, axis, suffix=f"_{k}" if len(axes) > 1 else "")
    return [x]


@add_converter("Transpose", 1)
@add_converter("Transpose", 13)
@add_converter("Transpose", 21)
@add_converter("Transpose", 23)
@add_converter("Transpose", 24)
@add_converter("Transpose", 25)
def convert_transpose(ctx) -> list:
    x = ctx.dynamic(0)
    rank = len(ctx.shape(x))
    perm = ctx.attr("perm") or list(reversed(range(rank)))
    if perm[0] != 0:
        ctx.unsupported("perm", perm, "dimension 0 (the batch) must stay first")
    if list(perm) == list(range(rank)):
        return [x]
    return [ctx.call_function(torch.permute, x, tuple(perm))]


@add_converter("Concat", 11)
@add_converter("Concat", 13)
def convert_concat(ctx) -> list:
    values = [ctx.input(i) for i in range(len(ctx.node.input))]
    data = next(v for v in values if isinstance(v, fx.Node))
    rank = len(ctx.shape(data))
    axis = normalize_axis(ctx, ctx.attr("axis"), rank)
    if axis == 0:
        ctx.unsupported("axis", ctx.attr("axis"), "concatenating along the batch dimension")
    parts = [v if isinstance(v, fx.Node) else ctx.tensor(ctx.constant(i)) for i, v in enumerate(values)]
    if len(parts) == 1:
        return parts
    return [ctx.call_function(torch.cat, parts, axis)]


@add_converter("Shape", 1)
@add_converter("Shape", 13)
@add_converter("Shape", 15)
@add_converter("Shape", 19)
@add_converter("Shape", 21)
@add_converter("Shape", 23)
@add_converter("Shape", 24)
@add_converter("Shape", 25)
def convert_shape(ctx) -> list:
    """The shape of the data: static except the batch entry, which is evaluated at the probe sizes."""
    static = ctx.shape(ctx.dynamic(0))[1:]
    start, end = ctx.attr("start", 0), ctx.attr("end")
    shapes = [np.array((b, *static), dtype=np.int64)[start:end] for b in BATCH_PROBES]
    if np.array_equal(*shapes):
        return [shapes[0]]
    return [BatchDependent(tuple(shapes))]


def _constant_only(ctx) -> list:
    ctx.fail(f"{ctx.op_type} of the network's data is not supported (only of constants and shapes)")


# ReduceProd: tf2onnx's flatten multiplies the non-batch dimensions of the shape
for _op, _versions in {"Gather": (11, 13), "Slice": (11, 13), "ConstantOfShape": (9, 20, 21, 23, 24, 25),
                       "Constant": (11, 12, 13, 19, 21, 23, 24, 25), "Range": (11, 27),
                       "ReduceProd": (11, 13, 18)}.items():
    for _version in _versions:
        add_converter(_op, _version)(_constant_only)


@add_converter("Cast", 9)
@add_converter("Cast", 13)
@add_converter("Cast", 19)
@add_converter("Cast", 21)
@add_converter("Cast", 23)
@add_converter("Cast", 24)
@add_converter("Cast", 25)
@add_converter("Cast", 28)
def convert_cast(ctx) -> list:
    """Casting the data to its own type is the identity; other casts only on constants."""
    x = ctx.dynamic(0)
    to = ctx.attr("to")
    ctx.attr("saturate"), ctx.attr("round_mode")  # float8 only
    if helper.tensor_dtype_to_np_dtype(to) != ctx.probe(x).numpy().dtype:
        ctx.unsupported("to", helper.tensor_dtype_to_string(to), f"the data is {ctx.probe(x).dtype}")
    return [x]
