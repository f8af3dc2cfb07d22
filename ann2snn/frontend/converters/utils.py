"""Attribute logic shared by several converters: padding (pads / auto_pad), axes, the batch rule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from torch import fx

from ..reader import MAX_PROBE_ELEMENTS

Pairs = list[tuple[int, int]]  # (begin, end) padding of each spatial dimension


@dataclass(frozen=True)
class PadValue:
    """What an ONNX Pad did to the tensor it made (the fx node's meta["onnx_pad"]), so that the
    Conv or MaxPool reading that tensor can take the padding as its own where that is exact."""

    node: str           # the Pad's ONNX name
    source: fx.Node     # the tensor before padding
    pairs: Pairs        # (begin, end) of each spatial dimension, all >= 0
    mode: str           # ONNX's: "constant", "edge" or "reflect"
    value: float        # the constant of constant mode
    non_negative: bool  # the source is >= 0 (a ReLU-like op or a QDQ clamped at zero made it)


def take_pad(ctx, x: fx.Node, pairs: Pairs, exact: Callable[[PadValue, Pairs], bool]) -> tuple[fx.Node, Pairs]:
    """`x` and the consumer's padding `pairs`; when `x` is a Pad's output and `exact(pad, combined)`
    says that padding by `combined` (the Pad's pairs plus the consumer's) is the same, the Pad's
    input and `combined` instead, recorded in the conversion report."""
    pad = x.meta.get("onnx_pad")
    if pad is None:
        return x, pairs
    combined = [(a + c, b + d) for (a, b), (c, d) in zip(pad.pairs, pairs)]
    if not exact(pad, combined):
        return x, pairs
    ctx.builder.rewrites.append({"pass": "import", "pad": pad.node, "folded_into": ctx.node.name,
                                 "mode": pad.mode, "pads": [list(p) for p in pad.pairs]})
    return pad.source, combined


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
    check_padded_size(ctx, in_spatial, pairs)
    return pairs


def check_padded_size(ctx, sizes: Sequence[int], pairs: Pairs) -> None:
    """Refuse, before the probe allocates it, padding that makes a tensor absurdly large."""
    padded = math.prod(size + begin + end for size, (begin, end) in zip(sizes, pairs))
    if padded > MAX_PROBE_ELEMENTS:
        ctx.fail(f"padding {[list(p) for p in pairs]} makes {padded:,} elements, more than the "
                 f"{MAX_PROBE_ELEMENTS:,} the importer handles")


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


def check_batch_broadcast(ctx, constant: np.ndarray, data_rank: int) -> None:
    """A constant operand of the data's rank needs size 1 in dimension 0, else it would broadcast
    the batch: a probe at batch 1 would silently grow to its B rows. The one exception, a file's
    fixed batch size B0, is recorded: such a graph runs at B0 only, which convert refuses."""
    if not (isinstance(constant, np.ndarray) and constant.ndim == data_rank and constant.shape[0] != 1):
        return
    if constant.shape[0] != ctx.builder.declared_batch:
        ctx.fail(f"a constant of shape {list(constant.shape)} broadcasts across the batch dimension "
                 "(its dimension 0 must be 1)")
    ctx.builder.fixed_batch_nodes.append(f"{ctx.node.name or ctx.op_type!r} (constant {list(constant.shape)})")
