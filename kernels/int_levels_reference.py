"""Pure-PyTorch reference of kernels/int_levels.py: int32 accumulators to levels by integer thresholds.

ann2snn.runtime.integer derives the thresholds, per channel c the smallest accumulator reaching
each level above lo (ascending, int64, UNREACHABLE for a level no int32 reaches); a level is then
lo + #{k : t[c, k] <= A}, integer only.
"""
from __future__ import annotations

import torch
from torch import Tensor

UNREACHABLE = 2 ** 31   # the threshold of a level no int32 accumulator reaches


_CHANNEL_STRIDE = 2 ** 33   # wider than the span of thresholds and int32 accumulators


def levels_from_thresholds(accumulator: Tensor, thresholds: Tensor, lo: int) -> Tensor:
    """y = lo + #{k : t[c, k] <= A}, integer only: accumulator [N, C, *spatial] (any memory
    layout), thresholds [C, L]. One search over all channels at once: channel c's thresholds and
    accumulators are lifted by c * 2^33, so the lifted thresholds form one sorted sequence and
    the rank of a lifted A is c * L + its count."""
    channels, per_channel = thresholds.shape
    lift = torch.arange(channels, dtype=torch.int64) * _CHANNEL_STRIDE
    sequence = (thresholds.to(torch.int64) + lift[:, None]).reshape(-1)
    channels_last = accumulator.movedim(1, -1)   # a contiguous view when the memory is channels-last
    rank = torch.searchsorted(sequence, (channels_last.to(torch.int64) + lift).contiguous(), right=True)
    return (rank - (torch.arange(channels, dtype=torch.int64) * per_channel - lo)).movedim(-1, 1)
