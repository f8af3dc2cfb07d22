"""Pure-PyTorch reference of kernels/requantize.py: a neuron site's terms to its levels, as the QDQ graph computes it.

    V = sum_i float32(A_i + add_i) * scale_i   (float32, in order)
    level = clamp(round_half_even(V / theta), low, high) - low
(low, high = qmin - zero point, qmax - zero point: onnxruntime's QuantizeLinear, docs/integer.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..levels import channel_view, popcount_sum_
from .int_levels import level_dtype


class Term(NamedTuple):
    """One accumulator of a site: values [N, C, *spatial], uint8 levels, int32, or float32 holding
    integers of magnitude < 2^24 (oneDNN's output); `add` (int [C] or [1]) is added exactly first,
    and `scale` (float32 [C] or [1]) is the float32 scale of the sum."""

    values: Tensor
    scale: Tensor
    add: Tensor | None = None


@dataclass(frozen=True)
class Requantization:
    """The QuantizeLinear of a site: theta float32 [C] or [1], levels low..high (qmin - zp, qmax - zp)."""

    theta: Tensor
    low: int
    high: int


def quantize_(value: Tensor, theta: Tensor, low: int, high: int, channel_dim: int = 1) -> Tensor:
    """clamp(round_half_even(value / theta), low, high) - low, in place in value's float dtype
    (theta per channel along `channel_dim`, or one)."""
    value.div_(channel_view(theta.to(value.device, torch.float32), value.dim(), channel_dim))
    value.clamp_(float(low), float(high)).round_()
    return value.sub_(float(low)) if low else value


def exact_float32(term: Term) -> Tensor:
    """float32(values + add): the sum taken exactly (int64, or float32 below 2^24), rounded once."""
    values = term.values
    if term.add is None:
        return values.to(torch.float32)
    add = channel_view(term.add.to(values.device), values.dim())
    if values.is_floating_point():
        return values + add.to(torch.float32)
    return (values.to(torch.int64) + add.to(torch.int64)).to(torch.float32)


def potential_of(terms: list[Term]) -> Tensor:
    """V = sum_i float32(A_i + add_i) * scale_i, in float32, in order."""
    total = None
    for term in terms:
        value = exact_float32(term)
        value.mul_(channel_view(term.scale.to(value.device, torch.float32), value.dim()))
        total = value if total is None else total.add_(value)
    return total


def requantize_levels_reference(terms: list[Term], requantization: Requantization, *,
                                sample_spikes: bool = False) -> tuple[Tensor, Tensor | None]:
    """(levels in level_dtype, spikes per sample or None) by PyTorch ops."""
    levels = quantize_(potential_of(terms), requantization.theta, requantization.low, requantization.high)
    top = requantization.high - requantization.low
    spikes = popcount_sum_(levels.clone(), top, tuple(range(1, levels.dim()))) if sample_spikes else None
    return levels.to(level_dtype(0, top)), spikes
