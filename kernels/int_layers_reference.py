"""Pure-PyTorch reference of the integer layers (kernels/int_layers.py): int64, no tricks.

The levels and weights are widened to int64 and multiplied as written; a convolution runs in
float64 (torch has no int64 conv), which is exact while every partial sum stays below 2^53 in
magnitude: with |w| <= 128 and 16-bit levels, any layer of fewer than 2^30 taps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def int_linear_reference(levels: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The accumulator A = levels @ weight^T + bias in int64: levels [N, K], weight [O, K]."""
    accumulator = levels.long() @ weight.long().t()
    return accumulator if bias is None else accumulator + bias.long()


def int_conv2d_reference(levels: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                         dilation=1, groups: int = 1) -> Tensor:
    """The accumulator of nn.Conv2d (zero padding) on integer levels and weights, in int64."""
    accumulator = F.conv2d(levels.double(), weight.double(), None if bias is None else bias.double(),
                           stride, padding, dilation, groups)
    return accumulator.long()
