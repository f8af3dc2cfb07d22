"""Attribute logic shared by several converters: padding (pads / auto_pad), axes, the batch rule."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Pairs = list[tuple[int, int]]  # (begin, end) padding of each spatial dimension


def spatial_padding(ctx, in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                    dilations: Sequence[int]) -> Pairs:
    """The (begin, end) padding of each spatial dimension, from `pads` or `auto_pad`."""
    rank = len(in_spatial)
    auto_pad = ctx.attr("auto_pad")
    pads = ctx.attr("pads") or [0] * (2 * rank)
    if auto_pad == "NOTSET":
        if len(pads) != 2 * rank:
            ctx.unsupported("pads", pads, f"expected {2 * rank} values")
        pairs = list(zip(pads[:rank], pads[rank:]))
    elif auto_pad == "VALID":
        pairs = [(0, 0)] * rank
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = []
        for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            # SAME_UPPER puts the odd extra pixel at the end, SAME_LOWER at the beginning.
            pairs.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    else:
        ctx.unsupported("auto_pad", auto_pad)
    if any(p < 0 for pair in pairs for p in pair):
        ctx.unsupported("pads", pads, "negative padding")
    return pairs


def native_padding(pairs: Pairs, limits: Sequence[float] | None = None) -> tuple[int, ...] | None:
    """Symmetric padding a torch layer can take itself (within `limits`), else None."""
    if any(begin != end for begin, end in pairs):
        return None
    if limits is not None and any(begin > limit for (begin, _), limit in zip(pairs, limits)):
        return None
    return tuple(begin for begin, _ in pairs)


def torch_pad(pairs: Pairs) -> tuple[int, ...]:
    """F.pad's argument: (begin, end) pairs from the last dimension to the first."""
    return tuple(p for pair in reversed(pairs) for p in pair)


def ints(values: Sequence | np.ndarray) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


def normalize_axis(ctx, axis: int, rank: int, name: str = "axis") -> int:
    if not -rank <= axis < rank:
        ctx.unsupported(name, axis, f"out of range for rank {rank}")
    return axis % rank


def axes_argument(ctx, rank: int) -> list[int] | None:
    """Sorted, normalized `axes` of Squeeze / ReduceMean: an attribute in old opsets, an input in new."""
    axes = ctx.constant(1, "axes") if ctx.has_input(1) else ctx.attr("axes")
    if axes is None:
        return None
    return sorted(normalize_axis(ctx, a, rank, "axes") for a in ints(axes))


def refuse_batch_move(ctx, detail: str) -> None:
    ctx.fail(f"{detail} moves the batch dimension (dimension 0 must stay the batch)")
